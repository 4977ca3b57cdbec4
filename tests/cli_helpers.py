"""Running a command line in-process from a test."""


def run_main(main, capsys, *args) -> tuple[int, str, str]:
    """Calls a CLI's `main(args)` in-process (compiled programs are shared); returns (exit
    code, stdout, stderr) as captured by pytest's `capsys`."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
