"""Task readers: real GLUE / CoNLL files (official row counts) and clear errors on bad input."""
from collections import Counter

import pytest

from pipeline.tasks import CONLL_LABELS, DataError, find_task_dir, get_task, read_split

# (task, file, official rows, label counts by label string) from ../shared/data/SOURCES.md
OFFICIAL = [
    ("sst2", "dev.tsv", 872, {"0": 428, "1": 444}),
    ("sst2", "train.tsv", 67349, {"0": 29780, "1": 37569}),
    ("mrpc", "dev.tsv", 408, {"0": 129, "1": 279}),
    ("mrpc", "train.tsv", 3668, {"0": 1194, "1": 2474}),
    ("stsb", "dev.tsv", 1500, None),
    ("rte", "dev.tsv", 277, {"entailment": 146, "not_entailment": 131}),
    ("rte", "train.tsv", 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("cola", "dev.tsv", 1043, {"0": 322, "1": 721}),
    ("cola", "train.tsv", 8551, {"0": 2528, "1": 6023}),
    ("qnli", "dev.tsv", 5463, {"entailment": 2702, "not_entailment": 2761}),
]


@pytest.mark.parametrize("name,file,rows,label_counts", OFFICIAL)
def test_glue_files_have_official_counts(shared_data, name, file, rows, label_counts):
    task = get_task(name)
    examples = read_split(task, find_task_dir(shared_data, task) / file)
    assert len(examples) == rows
    if label_counts:
        assert Counter(task.labels[e.label] for e in examples) == label_counts


def test_fields_keep_quotes_bom_and_pairs(shared_data):
    qnli = read_split(get_task("QNLI"), shared_data / "glue/QNLI/dev.tsv")
    assert sum(e.text_b.startswith('" ') for e in qnli) == 13  # SOURCES.md: 13 dev sentences start with `" `
    mrpc = read_split(get_task("MRPC"), shared_data / "glue/MRPC/dev.tsv")  # BOM before the header
    assert mrpc[0].text_b == '" The foodservice pie business does not fit our long-term growth strategy .'
    stsb = read_split(get_task("STS-B"), shared_data / "glue/STS-B/dev.tsv")
    assert (stsb[1].text_a, stsb[1].label) == ("A young child is riding a horse.", 4.75)
    cola = read_split(get_task("cola"), shared_data / "glue/CoLA/dev.tsv")  # no header, no final newline
    assert (cola[0].text_a, cola[0].text_b) == ("The sailors rode the breeze clear of the rocks.", None)


def test_conll_counts_match_the_official_table(shared_data):
    task = get_task("conll2003")
    for file, sentences, tokens, entities in [("valid.txt", 3250, 51362, {"LOC": 1837, "MISC": 922, "ORG": 1341, "PER": 1842}),
                                              ("train.txt", 14041, 203621, {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600})]:
        data = read_split(task, find_task_dir(shared_data, task) / file)
        assert len(data) == sentences
        assert sum(len(s.words) for s in data) == tokens
        begins = Counter(CONLL_LABELS[i][2:] for s in data for i in s.labels if CONLL_LABELS[i].startswith("B-"))
        assert begins == entities


def test_conll_refuses_iob1(shared_data):
    with pytest.raises(DataError, match=r"eng.train:\d+: I-\w+ follows O: not IOB2"):
        read_split(get_task("conll2003"), shared_data / "conll2003/original_iob1/eng.train")


def test_errors_name_the_task_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst3'; known tasks: sst2, mrpc"):
        get_task("sst3")
    with pytest.raises(FileNotFoundError, match="no RTE files"):
        find_task_dir(tmp_path, get_task("rte"))
    with pytest.raises(FileNotFoundError, match="dev.tsv: file not found"):
        read_split(get_task("rte"), tmp_path / "dev.tsv")

    bad = tmp_path / "dev.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: expected 4 tab-separated fields, got 3"):
        read_split(get_task("rte"), bad)
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: label 'neutral' is not one of task rte's labels"):
        read_split(get_task("rte"), bad)
    with pytest.raises(DataError, match=r"dev.tsv:1: header lacks column\(s\) \['sentence'\] of task sst2"):
        read_split(get_task("sst2"), bad)  # RTE file given for SST-2
    bad.write_text("sentence1\tsentence2\tscore\nx\ty\tfive\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: label 'five' is not a finite number"):
        read_split(get_task("stsb"), bad)
    conll = tmp_path / "valid.txt"
    conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"valid.txt:4: expected 'word ... tag' columns"):
        read_split(get_task("conll2003"), conll)
    conll.write_text("EU NNP B-NP B-ORGANIZATION\n")
    with pytest.raises(DataError, match=r"valid.txt:1: tag 'B-ORGANIZATION' is not one of"):
        read_split(get_task("conll2003"), conll)
