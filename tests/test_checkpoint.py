"""Training checkpoint directories (opensora_fast.checkpoint): kills at every point of ``write_step_dir``
(simulated with ``os._exit`` in a child process) leave a directory that resume reads back at its newest
complete step, stale temporaries are removed, ``keep_last`` prunes, checksums catch altered files, and
files and directories honour the umask."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from opensora_fast import checkpoint as C


def _write(step):
    def write(tmp):
        torch.save({"step": step, "optimizer": {}}, os.path.join(tmp, "train_state.pt"))
        with open(os.path.join(tmp, "weights.bin"), "wb") as f:
            f.write(os.urandom(256))

    return write


def _kill_during_write(ckpt_dir, step, die_at_replace=None, die_in_write=False):
    """Run write_step_dir(ckpt_dir, step) in a child process that dies (os._exit, no clean-up, as SIGKILL)
    at the ``die_at_replace``-th os.replace call (1-based, before it happens) or inside ``write``."""
    code = textwrap.dedent(
        f"""
        import os, torch
        from opensora_fast import checkpoint as C
        real, n = os.replace, [0]
        def replace(a, b):
            n[0] += 1
            if n[0] == {die_at_replace!r}:
                os._exit(9)
            real(a, b)
        os.replace = replace
        def write(tmp):
            torch.save({{"step": {step}, "optimizer": {{}}}}, os.path.join(tmp, "train_state.pt"))
            if {die_in_write!r}:
                os._exit(9)
        C.write_step_dir({str(ckpt_dir)!r}, {step}, write)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr


def _names(d):
    return sorted(os.listdir(d))


def test_kill_while_writing_leaves_a_temporary_that_resume_removes(tmp_path):
    ck = tmp_path / "ck"
    C.write_step_dir(str(ck), 2, _write(2))
    for _ in range(3):
        _kill_during_write(ck, 4, die_in_write=True)
    assert sum(n.startswith(".tmp-step-00000004") for n in _names(ck)) == 3
    assert C.resolve_resume(str(ck)) == str(ck / "step-00000002")
    assert _names(ck) == ["latest", "step-00000002"]  # stale temporaries gone


def test_kill_between_moving_the_old_step_aside_and_the_rename(tmp_path):
    """Re-saving step 4: killed after step-00000004 was moved aside, before the new one took its place:
    ``latest`` names a missing directory, yet a complete copy exists."""
    ck = tmp_path / "ck"
    C.write_step_dir(str(ck), 2, _write(2))
    C.write_step_dir(str(ck), 4, _write(4))
    _kill_during_write(ck, 4, die_at_replace=2)
    assert not (ck / "step-00000004").exists() and (ck / "latest").read_text().strip() == "step-00000004"
    path = C.resolve_resume(str(ck))
    assert path == str(ck / "step-00000004")
    assert torch.load(os.path.join(path, "train_state.pt"), weights_only=True)["step"] == 4
    assert _names(ck) == ["latest", "step-00000002", "step-00000004"]


@pytest.mark.parametrize("first", [True, False])
def test_kill_after_the_rename_before_latest(tmp_path, first):
    """The new step is in place but ``latest`` still names the previous one (or does not exist yet)."""
    ck = tmp_path / "ck"
    if not first:
        C.write_step_dir(str(ck), 2, _write(2))
    _kill_during_write(ck, 4, die_at_replace=2)  # after tmp -> step-00000004, before latest
    assert (ck / "step-00000004").is_dir()
    assert (ck / "latest").exists() != first
    assert C.resolve_resume(str(ck)) == str(ck / "step-00000004")
    assert not any(n.startswith(".tmp-") for n in _names(ck))
    assert (ck / "latest").read_text().strip() == "step-00000004"  # the pointer is repaired too


def test_keep_last(tmp_path):
    ck = tmp_path / "ck"
    for s in (1, 2, 3, 4, 5):
        C.write_step_dir(str(ck), s, _write(s), keep_last=2)
    assert _names(ck) == ["latest", "step-00000004", "step-00000005"]
    with pytest.raises(ValueError, match="keep_last"):
        C.prune(str(ck), 0)


def test_checksums_catch_flipped_truncated_and_missing_files(tmp_path):
    ck = tmp_path / "ck"
    d = C.write_step_dir(str(ck), 3, _write(3))
    sums = json.load(open(os.path.join(d, C.CHECKSUMS)))
    assert set(sums["sha256"]) == {"train_state.pt", "weights.bin"}
    C.verify_checkpoint(d)
    p = os.path.join(d, "weights.bin")
    data = bytearray(open(p, "rb").read())
    data[100] ^= 0x01
    open(p, "wb").write(bytes(data))
    with pytest.raises(C.CheckpointError, match=r"weights\.bin.*corrupt"):
        C.verify_checkpoint(d)
    open(p, "wb").write(bytes(data[:50]))
    with pytest.raises(C.CheckpointError, match=r"weights\.bin.*truncated"):
        C.verify_checkpoint(d)
    os.remove(p)
    with pytest.raises(C.CheckpointError, match=r"weights\.bin.*missing"):
        C.verify_checkpoint(d)


def test_unreadable_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(C.CheckpointError, match="model.safetensors.*unreadable") as e:
        C.load_safetensors_checked(str(bad))
    assert "\n" not in str(e.value)
    ts = tmp_path / "train_state.pt"
    torch.save({"step": 1, "optimizer": {"x": torch.randn(100)}}, ts)
    ts.write_bytes(ts.read_bytes()[:200])
    with pytest.raises(C.CheckpointError, match="train_state.pt.*unreadable") as e:
        C.load_torch_checked(str(ts))
    assert "\n" not in str(e.value)


def test_files_and_directories_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ck = tmp_path / "ck"
        d = C.write_step_dir(str(ck), 1, _write(1))
    finally:
        os.umask(old)
    assert os.stat(d).st_mode & 0o777 == 0o755
    for name in ("train_state.pt", "weights.bin", C.CHECKSUMS):
        assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o644, name
    assert os.stat(ck / "latest").st_mode & 0o777 == 0o644
