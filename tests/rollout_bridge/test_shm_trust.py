"""Shared-memory slots the client must not write into.

The client writes a weight chunk only into a slot file of a server on loopback: in the
slot directory the server named, opened without following links, a regular file of the
lent size with one link, mode 0600, owned by the server's user. A proxy in front of a real
server stands for a hostile one (or a local user racing the server): it rewrites each lend
to name another file. In every case that file is untouched and the push completes over
HTTP with the right weights. A server refuses a slot directory other users could swap
files in.
"""

import contextlib
import json
import logging
import os
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from rollout_bridge import shm, wire
from rollout_bridge.client import RolloutClient
from rollout_bridge.server import parse_args
from tests.rollout_bridge.servers import ROOT, serving_in_thread
from rollout_bridge.launch import running_server
from tests.rollout_bridge.test_shm import push_and_check

CHUNK = 200_000  # the tiny model in a few chunks, each in a slot of about 1.2 MB
PATTERN = b"do not overwrite "


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def server(model_dir, slot_dir, tmp_path_factory):
    args = ["--shm-dir", str(slot_dir), "--shm-mb", "8"]
    with running_server(model_dir, "transformers", args=args,
                        log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@contextlib.contextmanager
def lend_rewriting_proxy(target: str, rewrite):
    """A server in front of `target` whose slot lends pass through rewrite(lent) -> lent."""
    async def forward(request):
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, target + request.path_qs,
                                       data=await request.read(),
                                       headers={"Content-Type": request.content_type}) as answer:
                body, status = await answer.read(), answer.status
        if status == 200 and request.method == "POST" and request.path.endswith("/slots"):
            body = json.dumps(rewrite(json.loads(body))).encode()
        return web.Response(body=body, status=status, content_type="application/json")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    with serving_in_thread(app) as url:
        yield url


def make_victim(path, size: int) -> bytes:
    """A file the push must leave alone: `size` bytes of a pattern, mode 0600."""
    content = (PATTERN * (size // len(PATTERN) + 1))[:size]
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, 0o600)
    return content


def symlinked_slot(lent, slot_dir, tmp_path):
    """A local user swapped the lent slot for a link to a file of someone else."""
    victim = tmp_path / "root_owned.bin"
    content = make_victim(victim, 4 << 20)
    os.unlink(lent["path"])
    os.symlink(victim, lent["path"])
    return lent, victim, content


def outside_the_slot_directory(lent, slot_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    victim = tmp_path / "elsewhere" / os.path.basename(lent["path"])
    content = make_victim(victim, lent["capacity"])
    return {**lent, "path": str(victim)}, victim, content


def another_file(lent, slot_dir, tmp_path):
    """A fake server naming a file that is no slot (in the slot directory, sized to fit)."""
    victim = slot_dir / "trainer_checkpoint.bin"
    content = make_victim(victim, 4 << 20)
    return {**lent, "path": str(victim), "capacity": 4 << 20}, victim, content


def too_small_file(lent, slot_dir, tmp_path):
    victim = slot_dir / f"{shm.PREFIX}1-small-0"
    content = make_victim(victim, 1000)
    return {**lent, "path": str(victim)}, victim, content


def another_users_file(lent, slot_dir, tmp_path):
    victim = slot_dir / f"{shm.PREFIX}1-nobody-0"
    content = make_victim(victim, lent["capacity"])
    os.chown(victim, 65534, 65534)
    return {**lent, "path": str(victim)}, victim, content


def hard_link(lent, slot_dir, tmp_path):
    """A slot-named second link to a file elsewhere."""
    victim = tmp_path / "linked.bin"
    content = make_victim(victim, lent["capacity"])
    os.link(victim, slot_dir / f"{shm.PREFIX}1-link-0")
    return {**lent, "path": str(slot_dir / f"{shm.PREFIX}1-link-0")}, victim, content


SWAPS = [symlinked_slot, outside_the_slot_directory, another_file, too_small_file,
         another_users_file, hard_link]


@pytest.mark.parametrize("swap", SWAPS)
def test_a_lent_path_that_is_no_slot_is_untouched_and_the_push_goes_over_http(
        server, slot_dir, models, tokenizer, tmp_path, caplog, swap):
    victims = []

    def rewrite(lent):
        if victims:  # the client stops asking after the first refusal; untouched anyway
            return lent
        lent, victim, content = swap(lent, slot_dir, tmp_path)
        victims.append((victim, content))
        return lent

    with lend_rewriting_proxy(server.url, rewrite) as url:
        client = RolloutClient([url], chunk_bytes=CHUNK, upload_threads=1)
        with caplog.at_level(logging.WARNING, logger="rollout_bridge.client"):
            # models B and C in turn: each push must serve its own weights
            push_and_check(client, models[1 + SWAPS.index(swap) % 2], tokenizer)
        client.close()
    [(victim, content)] = victims
    assert victim.read_bytes() == content
    assert "will not write" in caplog.text and "this push goes over HTTP" in caplog.text


def test_slots_are_tried_only_for_a_server_on_loopback():
    for url in ("http://127.0.0.1:8470", "http://localhost:8470", "http://[::1]:8470",
                "http://127.3.0.1"):
        assert wire.is_loopback_url(url), url
    for url in ("http://10.0.0.5:8470", "http://node1:8470", "http://[fe80::1]:1", "nope"):
        assert not wire.is_loopback_url(url), url


@pytest.mark.parametrize("mode, owner, problem", [
    (0o777, 0, "writable by other users (mode 0777, no sticky bit)"),
    (0o770, 0, "writable by other users (mode 0770, no sticky bit)"),
    (0o755, 65534, "owned by uid 65534"),
    (0o1777, 0, None),  # as /dev/shm: nobody may replace another user's file
    (0o700, 0, None)], ids=["0777", "0770", "other_owner", "sticky_1777", "0700"])
def test_the_server_refuses_a_slot_directory_other_users_could_swap_files_in(
        tmp_path, capsys, mode, owner, problem):
    directory = tmp_path / "slots"
    directory.mkdir()
    os.chmod(directory, mode)
    os.chown(directory, owner, -1)
    argv = ["--model", "x", "--shm-dir", str(directory)]
    if problem is None:
        assert parse_args(argv).shm_dir == str(directory)
        assert parse_args(argv + ["--shm-mb", "0"]).shm_mb == 0
        return
    assert parse_args(argv + ["--shm-mb", "0"]).shm_mb == 0  # no slots: no directory needed
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f"--shm-dir {directory} is {problem}" in line and "--shm-mb 0" in line


def test_the_refusal_is_one_line_before_the_model_loads(tmp_path):
    directory = tmp_path / "slots"
    directory.mkdir()
    os.chmod(directory, 0o777)
    out = subprocess.run([sys.executable, "-m", "rollout_bridge.server", "--model", "missing",
                          "--shm-dir", str(directory)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "writable by other users" in out.stderr
