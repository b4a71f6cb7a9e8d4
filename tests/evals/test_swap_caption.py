"""The ``swap_caption`` eval's caption edits (ARO / NegCLIP-style swaps)."""
from fmjax.evals.swap_caption import fix_articles, swap_words

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "heart", "ring")


def test_attribute_and_object_swaps():
    cap = "a red circle left of an orange square."
    assert swap_words(cap, COLOURS) == "an orange circle left of a red square."
    assert swap_words(cap, SHAPES) == "a red square left of an orange circle."
    # one distinct word of the group: nothing to swap
    assert swap_words("a cyan ring above an orange ring.", SHAPES) is None
    assert swap_words("a photo of a red star.", COLOURS) is None
    # every occurrence is exchanged, a third word stays
    assert swap_words("red, blue, red and green", COLOURS) == "blue, red, blue and green"
    # whole words only
    assert swap_words("a reddish circle and a blue star", COLOURS) is None


def test_articles_follow_the_next_word():
    assert fix_articles("a orange and an red, A apple") == "an orange and a red, An apple"
    assert fix_articles("a man") == "a man"
