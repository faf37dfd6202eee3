"""The dev/test leakage filter on known near-duplicates and on texts that merely share words."""

from dontstop_jax.selection.leakage import LeakageFilter

TEST = [
    "the kinase phosphorylates the membrane receptor after ligand binding in human cells",
    "graph neural networks propagate messages along the edges of a molecule",
]


def test_exact_and_near_copies_are_caught():
    guard = LeakageFilter(TEST)
    assert guard.match("The kinase phosphorylates the membrane-receptor, after ligand binding in HUMAN cells!")
    assert guard.match("the kinase phosphorylates the membrane receptor after ligand binding in mouse cells")
    assert guard.match("Background. " + TEST[1] + " We then study a different question at length here.")
    assert guard.match("graph neural networks propagate messages along the edges")  # a fragment of a test text


def test_texts_sharing_only_words_or_short_phrases_pass():
    guard = LeakageFilter(TEST)
    assert not guard.match("the receptor binds a kinase in human cells after the membrane is opened")
    assert not guard.match("messages propagate along edges in graph neural networks of a different kind")
    assert not guard.match("kinase")  # a one-word document equals no test example
    assert LeakageFilter(["kinase"]).match("Kinase.")
