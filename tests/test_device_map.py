"""The peft engine's placement: --device-map and --max-memory shape accelerate's map, also without
a GPU; a model that would need disk offload is refused before any weight is read."""

import pytest

from merger import OptionsError, UnsupportedError, merge_adapter
from merger.cli import main
from merger.demo import build_demo_pair
from merger.options import MergeOptions, parse_max_memory


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_demo_pair(tmp_path_factory.mktemp("placement"))


def test_max_memory_is_parsed_into_accelerate_limits():
    assert parse_max_memory("0=20GiB, 1=10GB,cpu=512MiB") == {0: 20 * 2**30, 1: 10**10, "cpu": 512 * 2**20}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize(("values", "message"), [
    ({"max_memory": "cpu:2G"}, "option max_memory: 'cpu:2G' in 'cpu:2G' is not DEVICE=SIZE; write GPU indices and cpu, e.g. 0=20GiB,cpu=60GiB"),
    ({"max_memory": "cpu=lots"}, "option max_memory: 'lots' is not a size like 5GB or 500MB"),
    ({"max_memory": "cpu=2GiB", "device_map": "cpu"}, "option max_memory: it limits --device-map auto, not 'cpu'; drop it or use --device-map auto"),
    ({"device_map": "tpu"}, "option device_map: 'tpu' is not auto, cpu, cuda or cuda:N"),
])
def test_bad_placement_options_are_refused_up_front(values, message):
    with pytest.raises(OptionsError) as caught:
        MergeOptions.from_mapping(values)
    assert str(caught.value) == message


def test_a_memory_limit_places_the_model_on_the_cpu_too(pair, tmp_path, caplog):
    # no GPU here: before, a limit was dropped unless a GPU was visible; now accelerate's map is
    # computed (and respected) on any machine
    caplog.set_level("DEBUG", logger="merger.engines.peft")
    result = merge_adapter(*pair, tmp_path / "out", engine="peft", max_memory="cpu=2GiB", validate="full")
    assert result.validation.ok and result.validation.metrics["logits_checked"] is True
    assert "device map: {'': 'cpu'}" in caplog.text


def test_a_model_that_would_spill_to_disk_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--base", str(pair[0]), "--adapter", str(pair[1]), "--out", str(out), "--engine", "peft", "--max-memory", "cpu=20KB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --engine peft: the model does not fit in the memory it may use (cpu=20.00 KB); 1 module (the whole model) would be offloaded to disk")
    assert ", where PEFT's merge is not written back; use --engine stream" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(UnsupportedError):
        merge_adapter(*pair, out, engine="peft", max_memory="cpu=20KB")
