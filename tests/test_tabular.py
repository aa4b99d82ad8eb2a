"""data.tabular: the delimiter is sniffed from the header, so captions with commas survive in a TSV."""

from clipft.data.tabular import sniff_delimiter


def test_sniff_delimiter():
    assert sniff_delimiter("filepath,caption\na.jpg,a dog\n") == ","
    assert sniff_delimiter("filepath\tcaption\na.jpg\ta dog, running\n") == "\t"
