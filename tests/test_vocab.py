import numpy as np
import pytest

from studyrec.data import Vocabulary


def test_reference_vocabulary_fixture(tmp_path):
    vocab = Vocabulary({"A": 1, "B": 2, "C": 3, "<SEP>": 4}, oov=5)
    assert vocab["A"] == 1 and vocab.encode("C") == 3
    assert vocab.encode("Z") == 5 and vocab.decode(5) == "<OOV>"
    assert vocab.decode(15) == "<UNDEF>" and vocab.decode(2) == "B"
    vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again == vocab
    assert [again.decode(i) for i in range(6)] == [vocab.decode(i) for i in range(6)]


def test_build_orders_by_count_then_first_appearance():
    # The sorted sample data of spec §12: ties keep first appearance.
    titles = ["PJ08", "HB11", "HB11", "XF15", "FN75", "LG87", "LG87", "GY75", "XF15"]
    vocab = Vocabulary.build(titles)
    assert [vocab.decode(i) for i in range(1, 7)] == ["HB11", "XF15", "LG87", "PJ08", "FN75", "GY75"]
    assert vocab.sep == 7 and vocab.oov == 8 and len(vocab) == 8 and vocab.logits_size == 9


def test_build_keeps_top_k_and_maps_the_rest_to_oov():
    vocab = Vocabulary.build(["a", "b", "b", "c", "c", "c"], max_size=2)
    assert vocab.encode("c") == 1 and vocab.encode("b") == 2 and vocab.encode("a") == vocab.oov
    np.testing.assert_array_equal(vocab.encode_many(["c", "a", "b", "zz"]), [1, vocab.oov, 2, vocab.oov])
    np.testing.assert_array_equal(vocab.decode_many([1, 2, vocab.oov, 99]), ["c", "b", "<OOV>", "<UNDEF>"])


def test_titles_are_strings():
    vocab = Vocabulary.build(["007", "7", "007"])
    assert vocab.encode("007") == 1 and vocab.encode("7") == 2


def test_json_layout_is_the_references(tmp_path):
    import json

    Vocabulary.build(["x", "y"]).save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert data == {"oov": "4", "vocab": {"x": "1", "y": "2", "<SEP>": "3"}}


def test_invalid_mappings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="padding"):
        Vocabulary({"A": 0, "<SEP>": 1}, oov=2)
    with pytest.raises(ValueError, match="OOV"):
        Vocabulary({"A": 1, "<SEP>": 2}, oov=2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
