import configparser
import pathlib

from cupy_transformer import cli
from tests.conftest import HAVE_GPU

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_kernels(capsys):
    assert cli.main(["info", "--arch", "90"]) == 0
    text = capsys.readouterr().out
    assert "cupy_transformer" in text and "CuPy" in text and "compile cache" in text
    assert "norm.cu" in text
    if not HAVE_GPU:
        assert "sm_90 with NVRTC alone" in text


def test_setup_cfg_lists_every_package():
    # setup.cfg names packages explicitly (kernels_cu is mapped into the package): a new sub-package
    # missing from that list would be absent from an installed copy.
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cupy_transformer").rglob("__init__.py")
    } | {"cupy_transformer.kernels_cu"}
    assert listed == found
