"""docs/erniekit_parity.md against the engine config the cookbook profile really writes: every row's "this project"
value is what `dpo_config` puts in the YAML (or the key is absent where the table says "not written")."""
import yaml

from conftest import ROOT
from test_docs import compose


def parity_rows():
    rows = {}
    for line in (ROOT / "docs/erniekit_parity.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("key", "---"):
            rows[cells[0]] = cells[3]
    return rows


def test_the_parity_table_is_what_the_cookbook_profile_composes(tmp_path):
    from ernie_dpo import engine

    params = compose(["profile=cookbook"], tmp_path)
    cfg = engine.dpo_config("models/base", "pairs.jsonl", "out", params["engine"]["device"], params["train"],
                            params["engine"])
    rows = parity_rows()
    assert len(rows) >= 20 and rows["normalize_logps"] == "True"
    engine_keys = {k for k in rows if k not in ("dropout",)}
    for key in engine_keys:
        ours = rows[key]
        if ours == "(not written)":
            assert key not in cfg, f"{key}: the table says not written, the engine YAML has {cfg[key]!r}"
        else:
            assert key in cfg, f"{key}: the table says {ours}, the engine YAML does not set it"
            assert cfg[key] == yaml.safe_load(ours), f"{key}: the table says {ours}, the engine YAML has {cfg[key]!r}"
    # ERNIEKit's loss: length-normalised log-probabilities, on every profile unless a profile says otherwise
    for profile in ("demo", "smol", "cookbook"):
        assert compose([f"profile={profile}"], tmp_path)["train"]["normalize_logps"] is True
