"""Stop strings on streamed text (`inference.stops`): host only, no JAX."""

import pytest

from safevlm_jax.inference.stops import StopStrings


def feed(stops, pieces):
    s, out = StopStrings(stops), []
    for piece in pieces:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            return out, True
    return out + [s.flush()], False


def test_a_stop_split_across_pieces_is_found_and_nothing_of_it_is_given_out():
    out, hit = feed(["\nUser:"], ["Hello", "\nUs", "er", ": more"])
    assert hit and out == ["Hello", "", "", ""]


def test_text_is_held_back_only_while_it_could_start_a_stop():
    out, hit = feed(["###", "END"], ["a#", "#b", " E", "Nd", "!"])
    assert not hit and out == ["a", "##b", " ", "ENd", "!", ""]


@pytest.mark.parametrize("pieces", [["abcSTOPdef"], ["abcS", "TOP"], list("abcSTOPdef")])
def test_the_earliest_stop_wins_whatever_the_pieces(pieces):
    out, hit = feed(["TOP", "cST"], pieces)
    assert hit and "".join(out) == "ab"
