"""Training checkpoints as a user meets them (issue 16): a stage snapshot is a model directory
(Embedder.from_pretrained loads it), resuming with other stages than the checkpoint's is an error
naming the difference, and saved files get the user's normal file mode (umask), not 0600."""
import json
import os
import stat

import pytest
import torch

from embedkit import Embedder, EmbedderConfig
from embedkit.train import Example, Stage, Task, Trainer
from embedkit.train import checkpoint as ckpt_io

pytestmark = pytest.mark.slow  # training runs


def _model(seed=0):
    torch.manual_seed(seed)
    return Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(8, 16, 32)))


def _task():
    return Task("t", [Example(query=f"q{i} word", positive=f"p{i} text") for i in range(8)], batch_size=4)


def _stages(*spec):
    return [Stage(name, [_task()], steps=steps, lr=1e-3, bf16=False) for name, steps in spec]


def _trainer(tmp_path, spec=(("pre", 2), ("fine", 2)), seed=0):
    return Trainer(_model(seed), _stages(*spec), progress=False, output_dir=tmp_path, seed=1)


# ---- a stage snapshot is a model directory ----------------------------------------------------------

def test_stage_snapshot_loads_with_from_pretrained(tmp_path):
    t = _trainer(tmp_path)
    t.fit(max_steps=2)  # stage "pre" done: its snapshot is written
    snap = tmp_path / "stage-pre"
    assert (snap / "config.json").is_file()
    loaded = Embedder.from_pretrained(snap)
    saved = ckpt_io.load(snap)[0]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the snapshot's weights are the trained ones (not the initial ones), and embed the same
    init = _model(0).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in saved.items())
    t.model.eval()
    loaded.eval()
    texts = ["alpha beta", "gamma"]
    with torch.no_grad():
        assert torch.allclose(loaded.encode(texts, dim=32), t.model.encode(texts, dim=32))
    # and it still resumes the run
    again = _trainer(tmp_path, seed=3)
    again.load_checkpoint(snap)
    assert again.stage_index == 0 and again.stage_step == 2


def test_periodic_checkpoint_loads_with_from_pretrained(tmp_path):
    t = Trainer(_model(), _stages(("s", 3)), progress=False, output_dir=tmp_path, checkpoint_every=1, seed=1)
    t.fit(max_steps=1)
    m = Embedder.from_pretrained(tmp_path / "step-1")
    assert m.config.to_dict() == t.model.config.to_dict()


# ---- the stage list must match the checkpoint's --------------------------------------------------------

@pytest.mark.parametrize("spec,msg", [
    ((("pre", 2), ("tune", 2)), r"stage 1 was 'fine' with 2 steps, but this Trainer's stage 1 is 'tune'"),
    ((("pre", 2), ("fine", 5)), r"stage 1 was 'fine' with 2 steps, but this Trainer's stage 1 is 'fine' with 5"),
    ((("warm", 2), ("fine", 2)), r"stage 0 was 'pre' with 2 steps, but this Trainer's stage 0 is 'warm'"),
    ((("pre", 2),), r"taken in stage 1 \('fine'\) but this Trainer has only 1 stage"),
])
def test_resume_with_other_stages_is_an_error_naming_the_mismatch(tmp_path, spec, msg):
    t = _trainer(tmp_path)
    t.fit()  # stage-fine snapshot: stage 1 at its last step
    other = _trainer(tmp_path, spec)
    with pytest.raises(ValueError, match=msg):
        other.load_checkpoint(tmp_path / "stage-fine")


def test_renamed_stage_no_longer_trains_nothing(tmp_path):
    """Before: the end-of-stage snapshot of 'fine' loaded into [pre, tune] resumed 'tune' at its last
    step and fit() returned at once, having trained nothing."""
    t = _trainer(tmp_path)
    t.fit()
    other = _trainer(tmp_path, (("pre", 2), ("tune", 2)))
    with pytest.raises(ValueError, match="'tune'"):
        other.load_checkpoint(tmp_path / "stage-fine")


def test_stages_after_the_checkpoint_may_be_appended(tmp_path):
    t = _trainer(tmp_path)
    t.fit(max_steps=2)  # inside / at the end of "pre"
    longer = _trainer(tmp_path, (("pre", 2), ("other", 1), ("more", 1)))
    longer.load_checkpoint(tmp_path / "stage-pre")
    longer.fit()
    assert longer.global_step == 4


def test_checkpoint_without_a_stage_record_still_loads(tmp_path):
    t = _trainer(tmp_path)
    t.fit(max_steps=1)
    ck = t.save_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "trainer.json").read_text())
    assert meta["stages"] == [{"name": "pre", "steps": 2}, {"name": "fine", "steps": 2}]
    del meta["stages"]  # as written before the record existed
    (ck / "trainer.json").write_text(json.dumps(meta))
    fresh = _trainer(tmp_path)
    fresh.load_checkpoint(ck)
    assert fresh.stage_step == 1


# ---- file modes follow the umask -------------------------------------------------------------------

def _modes(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    out["."] = stat.S_IMODE(os.stat(root).st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_checkpoint_and_model_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        t = _trainer(tmp_path)
        ck = t.save_checkpoint(tmp_path / "ck")
        model_dir = t.model.save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    for root in (ck, model_dir):
        modes = _modes(root)
        assert {"model.safetensors", "config.json"} <= set(modes)
        for name, mode in modes.items():
            is_dir = (root / name).is_dir()
            want = (0o777 if is_dir else 0o666) & ~umask
            assert mode == want, f"{root.name}/{name}: {oct(mode)} != {oct(want)} (umask {oct(umask)})"


def test_foreign_files_keep_their_mode(tmp_path):
    """save_pretrained into a directory with other files carries them over: their mode is theirs."""
    m = _model()
    out = tmp_path / "m"
    out.mkdir()
    secret = out / "notes.txt"
    secret.write_text("mine")
    os.chmod(secret, 0o600)
    m.save_pretrained(out)
    assert stat.S_IMODE(os.stat(out / "notes.txt").st_mode) == 0o600
