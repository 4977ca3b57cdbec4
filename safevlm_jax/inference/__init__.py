"""Generation: sampling rules (`sampling`), the jitted prefill + decode loop (`decode`) and
the image + question -> verdict + answer pipeline (`pipeline`)."""
