"""A Cloud TPU emulated on this machine, for tests/fakes/tpu_cloud/gcloud (which runs `Cloud.gcloud`) and the
test driving it (faults: `Cloud.preempt`, `Cloud.kill_worker`, `Cloud.inject`).

A slice is a directory per worker, used as that worker's HOME; `ssh --command` runs the command with bash
there and `scp` copies into it, so the worker scripts of infra/remote.py run for real and their jobs are
real detached process groups, as on a VM. Every process a worker starts carries FAKE_TPU_VM=<name>/<n>/<i>
in its environment (n: the slice's incarnation), which is how a preemption or a host crash finds them.
Workers see the "image" the test writes (`Image`): environment variables (the JAX coordinator of the
slice, its process count and id, CPU devices, where the bucket is), PATH with a python3.11, and a
prepared venv at ~/sophia-jax/venv whose .pth gives it this machine's installed packages (setup's pip then
installs the archive into it offline).

Lifecycles (seconds from the `Image`):
  tpu-vm create      CREATING -> READY after create_seconds (-> PREEMPTED instead when a fault says so)
  queued-resources   WAITING_FOR_RESOURCES for queue_seconds -> PROVISIONING (its node CREATING) ->
                     ACTIVE (node READY); a preempted node leaves its queued resource SUSPENDED
  preempt            STOPPING: SIGTERM to every process of the slice, SIGKILL after the grace -> PREEMPTED
  delete             every process of the slice SIGKILLed, its disks (worker directories) removed

Every call and fault is appended to events.jsonl with a timestamp (the test's timeline). Standard library
only; calls take turns on a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Cloud", "Image"]


@dataclasses.dataclass
class Image:
    """What every worker of every slice gets."""

    env: dict[str, str]  # environment variables (PATH is prefixed with the image's bin directory)
    site_packages: list[str]  # what the prepared venv's .pth adds to sys.path
    python: str  # the interpreter the venv is made from, also `python3.11` on PATH
    workers: int = 2
    devices: int = 4  # JAX CPU devices per worker
    create_seconds: float = 1.0
    queue_seconds: float = 1.0


class Cloud:
    """The emulator's state under `root` (state.json, events.jsonl, image.json, slices/)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------ state and events
    @contextlib.contextmanager
    def _state(self):
        with open(self.root / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / "state.json"
            state = json.loads(path.read_text()) if path.exists() else {"nodes": {}, "queued": {}, "faults": {},
                                                                          "incarnations": 0}
            self._advance(state)
            yield state
            path.write_text(json.dumps(state))

    def event(self, kind: str, **fields) -> None:
        with open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")

    def events(self) -> list[dict]:
        path = self.root / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def save_image(self, image: Image) -> None:
        (self.root / "image.json").write_text(json.dumps(dataclasses.asdict(image)))

    def image(self) -> Image:
        return Image(**json.loads((self.root / "image.json").read_text()))

    def inject(self, key: str, stderr: str, exit: int = 1, times: int = 1) -> None:
        """The next `times` calls matching `key` fail: a verb (create, describe, qr-create, ...) or "ssh:NAME"
        (a worker script: setup, launch, status, ...), or "creating:preempt" (the next VM created is
        preempted while CREATING)."""
        with self._state() as state:
            state["faults"].setdefault(key, []).extend([{"stderr": stderr, "exit": exit}] * times)

    def _fault(self, state: dict, key: str) -> dict | None:
        queue = state["faults"].get(key) or []
        return queue.pop(0) if queue else None

    def _advance(self, state: dict) -> None:
        """Moves the slices along their lifecycles to now."""
        image, now = self.image(), time.time()
        for name, qr in state["queued"].items():
            if qr["state"] == "WAITING_FOR_RESOURCES" and now >= qr["since"] + image.queue_seconds:
                qr.update(state="PROVISIONING", since=now)
                self._new_node(state, name, qr["type"], preempt=False)
            if qr["state"] in ("PROVISIONING", "ACTIVE"):
                node = state["nodes"].get(name)
                if node is None or node["state"] in ("PREEMPTED", "TERMINATED"):
                    qr.update(state="SUSPENDED", since=now)
                elif node["state"] == "READY":
                    qr["state"] = "ACTIVE"
        for node in state["nodes"].values():
            if node["state"] == "CREATING" and now >= node["since"] + image.create_seconds:
                node.update(state="PREEMPTED" if node.pop("preempt", False) else "READY", since=now)
                self.event("node", name=node["name"], state=node["state"], incarnation=node["incarnation"])

    def _new_node(self, state: dict, name: str, accelerator_type: str, preempt: bool) -> None:
        image = self.image()
        state["incarnations"] += 1
        n = state["incarnations"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        state["nodes"][name] = {"name": name, "state": "CREATING", "since": time.time(), "type": accelerator_type,
                                "incarnation": n, "port": port, "workers": image.workers, "preempt": preempt}
        for i in range(image.workers):
            self._make_disk(self.home(name, n, i), image)

    def home(self, name: str, incarnation: int, worker: int) -> Path:
        return self.root / "slices" / f"{name}-{incarnation}" / f"worker-{worker}"

    def _make_disk(self, home: Path, image: Image) -> None:
        """A fresh worker disk: the image's prepared venv (no packages of its own; its .pth adds this machine's)."""
        venv = home / "sophia-jax" / "venv"
        subprocess.run([image.python, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        (site / "_image.pth").write_text("".join(p + "\n" for p in image.site_packages))

    # ------------------------------------------------------------------------------- processes
    def _processes(self, marker: str) -> list[int]:
        """The pids whose environment holds FAKE_TPU_VM=<marker...> (this user's processes)."""
        needle = f"FAKE_TPU_VM={marker}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(item.startswith(needle) for item in environ.split(b"\0")):
                pids.append(int(entry.name))
        return pids

    def _signal(self, marker: str, sig: int) -> int:
        pids = self._processes(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)

    # -------------------------------------------------------------------------------- the faults
    def preempt(self, name: str, grace: float = 60.0) -> None:
        """A preemption: the slice goes STOPPING, every process gets SIGTERM, the rest SIGKILL after `grace`
        seconds, then the slice is PREEMPTED (its queued resource SUSPENDED)."""
        with self._state() as state:
            node = state["nodes"][name]
            node.update(state="STOPPING", since=time.time())
            marker = f"{name}/{node['incarnation']}/"
        count = self._signal(marker, signal.SIGTERM)
        self.event("fault", fault="preemption", name=name, detail=f"SIGTERM to {count} processes of the slice")
        deadline = time.monotonic() + grace
        while self._processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed = self._signal(marker, signal.SIGKILL)
        with self._state() as state:
            state["nodes"][name].update(state="PREEMPTED", since=time.time())
        self.event("node", name=name, state="PREEMPTED", detail=f"{killed} processes left after the grace, killed")

    def kill_worker(self, name: str, worker: int) -> int:
        """A host crash: SIGKILL to every process of one worker; the slice stays READY."""
        with self._state() as state:
            marker = f"{name}/{state['nodes'][name]['incarnation']}/{worker}/"
        count = self._signal(marker, signal.SIGKILL)
        self.event("fault", fault="host crash", name=name, detail=f"SIGKILL to {count} processes of worker {worker}")
        return count

    # ------------------------------------------------------------------------------------ gcloud
    def gcloud(self, argv: list[str], stdin: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `gcloud ARGV` with `stdin`."""
        self.event("call", argv=argv)
        if argv[:2] != ["compute", "tpus"] or len(argv) < 5 or argv[2] not in ("tpu-vm", "queued-resources"):
            return 2, "", f"ERROR: fake gcloud: unsupported {argv}\n"
        group, verb, name = argv[2], argv[3], argv[4]
        source = target = None
        if verb == "scp":  # scp SOURCE NAME:TARGET ...
            source, (name, _, target) = argv[4], argv[5].partition(":")
        flags = _flags(argv[6:] if verb == "scp" else argv[5:])
        key = ("qr-" if group == "queued-resources" else "") + verb
        if verb == "ssh":
            key = "ssh:" + flags.get("--command", "").partition("\n")[0].removeprefix("# sophia-tpu ").split(" ")[0]
        with self._state() as state:
            fault = self._fault(state, key)
            if fault is not None:
                self.event("fault", fault=key, detail=fault["stderr"].strip(), exit=fault["exit"])
                return fault["exit"], "", fault["stderr"]
            if group == "queued-resources":
                return self._queued(state, verb, name, flags)
            node = state["nodes"].get(name)
            if verb == "create":
                if node is not None:
                    return 1, "", f"ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: {name}\n"
                self._new_node(state, name, flags["--accelerator-type"],
                               preempt=self._fault(state, "creating:preempt") is not None)
                return 0, "", ""
            if node is None:
                return 1, "", (f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: Resource "
                               f"'projects/p/locations/z/nodes/{name}' was not found\n")
            if verb == "describe":
                return 0, json.dumps({"name": name, "state": node["state"], "acceleratorType": node["type"],
                                      "networkEndpoints": [{"ipAddress": "127.0.0.1"}] * node["workers"]}), ""
            if verb == "delete":
                self._delete(state, name)
                return 0, "", ""
            if node["state"] != "READY":
                return 255, "", f"ssh: connect to host {name}: Connection refused\n"
            node = dict(node)
        workers = range(node["workers"]) if flags["--worker"] == "all" else [int(flags["--worker"])]
        if verb == "scp":
            for i in workers:
                shutil.copy(source, self.home(name, node["incarnation"], i) / target)
            return 0, "", ""
        if verb == "ssh":
            return self._ssh(node, workers, flags["--command"], stdin)
        return 2, "", f"ERROR: fake gcloud: unsupported tpu-vm {verb}\n"

    def _queued(self, state: dict, verb: str, name: str, flags: dict[str, str]) -> tuple[int, str, str]:
        qr = state["queued"].get(name)
        if verb == "create":
            if qr is not None:
                return 1, "", f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}\n"
            state["queued"][name] = {"state": "WAITING_FOR_RESOURCES", "since": time.time(),
                                     "type": flags["--accelerator-type"]}
            return 0, "", ""
        if qr is None:
            return 1, "", f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: {name}\n"
        if verb == "describe":
            return 0, qr["state"] + "\n", ""
        if verb == "delete":
            del state["queued"][name]
            if name in state["nodes"]:
                self._delete(state, name)
            return 0, "", ""
        return 2, "", f"ERROR: fake gcloud: unsupported queued-resources {verb}\n"

    def _delete(self, state: dict, name: str) -> None:
        node = state["nodes"].pop(name)
        self._signal(f"{name}/{node['incarnation']}/", signal.SIGKILL)
        shutil.rmtree(self.root / "slices" / f"{name}-{node['incarnation']}", ignore_errors=True)
        self.event("node", name=name, state="deleted", incarnation=node["incarnation"])

    def _ssh(self, node: dict, workers, command: str, stdin: str) -> tuple[int, str, str]:
        image = self.image()
        bin_dir = self.root / "image-bin"
        bin_dir.mkdir(exist_ok=True)
        if not (bin_dir / "python3.11").exists():
            (bin_dir / "python3.11").symlink_to(image.python)
        processes = []
        for i in workers:
            home = self.home(node["name"], node["incarnation"], i)
            env = {**image.env, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{image.env.get('PATH', '')}",
                   "FAKE_TPU_VM": f"{node['name']}/{node['incarnation']}/{i}/",
                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{node['port']}", "JAX_NUM_PROCESSES": str(node["workers"]),
                   "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(image.devices)}
            processes.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(stdin) for p in processes]
        code = max(p.returncode for p in processes)
        return code, "".join(o for o, _ in outs), "".join(e for _, e in outs)


def _flags(args: list[str]) -> dict[str, str]:
    """--key value and --key=value pairs (a flag without a value maps to "")."""
    out, i = {}, 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if eq or i + 1 >= len(args) or args[i + 1].startswith("--"):
            out[key] = value
            i += 1
        else:
            out[key] = args[i + 1]
            i += 2
    return out


def main() -> int:
    """tests/fakes/tpu_cloud/gcloud: one call against the cloud under FAKE_TPU_ROOT."""
    cloud = Cloud(os.environ["FAKE_TPU_ROOT"])
    code, out, err = cloud.gcloud(sys.argv[1:], sys.stdin.read())
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
