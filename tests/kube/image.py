"""What a container gets from its image: environment, working directory, entrypoint and command.

The harness runs containers on this machine's own filesystem, so an "image" here is only the
configuration a Dockerfile gives a container. :func:`from_dockerfile` reads it from the
Dockerfile itself (``ENV``, ``WORKDIR``, ``ENTRYPOINT``, ``CMD``, ``USER``, following ``FROM``
through the file's own stages, with ``ARG`` defaults), so the environment of the node image's
containers stays what ``node_image/Dockerfile`` says. ``replace`` maps paths of the image onto
this machine (``/opt/llmswarm`` -> the virtualenv), so that ``llmswarm`` and ``python`` on the
image's ``PATH`` are the virtualenv's.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

#: What an external base image (ubuntu, nvidia/cuda, python) brings: the usual PATH.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Image:
    """A container image's runtime configuration."""

    env: dict[str, str] = field(default_factory=lambda: {"PATH": BASE_PATH})
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""  # USER: the container's uid[:gid] unless its securityContext says otherwise
    #: Accounts the image's RUN lines add (``groupadd``/``useradd``): its /etc/passwd and /etc/group lines.
    passwd: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)

    def command(self, container: Mapping[str, object]) -> list[str]:
        """The argv of a container, as a runtime builds it from ``command``/``args`` and the image."""
        command = container.get("command")
        args = container.get("args")
        if command:
            return [str(a) for a in command] + [str(a) for a in args or []]  # type: ignore[union-attr]
        return list(self.entrypoint) + ([str(a) for a in args] if args else list(self.cmd))  # type: ignore[union-attr]


def _expand(text: str, values: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs: comment lines dropped (also inside continuations), continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _exec_form(rest: str) -> list[str]:
    if rest.startswith("["):
        return [str(part) for part in json.loads(rest)]
    return ["/bin/sh", "-c", rest]


def from_dockerfile(path: Path, args: Mapping[str, str] | None = None, target: str | None = None,
                    replace_paths: Mapping[str, str] | None = None) -> Image:
    """The runtime configuration of the Dockerfile's last stage (or of stage ``target``)."""
    overrides = dict(args or {})
    global_args: dict[str, str] = {}
    stages: dict[str, Image] = {}
    image: Image | None = None
    stage_args: dict[str, str] = {}
    stage_name = ""
    last: Image | None = None
    for word, rest in _instructions(path.read_text()):
        if word == "ARG":
            name, has_default, default = rest.partition("=")
            scope = global_args if image is None else stage_args
            if name in overrides:
                scope[name] = overrides[name]
            elif has_default:
                scope[name] = _expand(default.strip().strip('"'), {**global_args, **stage_args})
            elif image is not None and name in global_args:
                scope[name] = global_args[name]
            continue
        if word == "FROM":
            parts = rest.split()
            base = _expand(parts[0], global_args)
            image = stages.get(base, Image())
            stage_args = {}
            if len(parts) >= 3 and parts[1].upper() == "AS":
                name = parts[2]
                stages[name] = image
            else:
                name = ""
            last = image
            stage_name = name
            continue
        if image is None:
            continue
        values = {**stage_args, **image.env}
        if word == "ENV":
            env = dict(image.env)
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV NAME value with spaces
                env[tokens[0]] = _expand(rest.partition(" ")[2].strip(), values)
            else:
                for token in tokens:
                    key, _, value = token.partition("=")
                    env[key] = _expand(value, {**stage_args, **env})
            image = replace(image, env=env)
        elif word == "WORKDIR":
            image = replace(image, workdir=str(PurePosixPath(image.workdir) / _expand(rest, values)))
        elif word == "ENTRYPOINT":
            image = replace(image, entrypoint=_exec_form(rest), cmd=[])  # a new entrypoint resets an inherited CMD
        elif word == "CMD":
            image = replace(image, cmd=_exec_form(rest))
        elif word == "USER":
            image = replace(image, user=_expand(rest, values))
        elif word == "RUN":
            passwd, group = _accounts(_expand(rest, values))
            image = replace(image, passwd=image.passwd + passwd, group=image.group + group)
        if stage_name:
            stages[stage_name] = image
        last = image
    if target is not None:
        chosen = stages.get(target)
        if chosen is None:
            raise ValueError(f"{path} has no stage {target!r}")
        last = chosen
    if last is None:
        raise ValueError(f"{path} has no FROM")
    return _replace_paths(last, replace_paths or {})


def _accounts(script: str) -> tuple[list[str], list[str]]:
    """/etc/passwd and /etc/group lines of the ``useradd``/``groupadd`` commands in a RUN line."""
    passwd, group = [], []
    for command in re.split(r"&&|;|\|\|", script):
        try:
            words = shlex.split(command)
        except ValueError:
            continue
        if not words or words[0] not in ("useradd", "groupadd"):
            continue
        options: dict[str, str] = {}
        name = ""
        i = 1
        while i < len(words):
            if words[i].startswith("--") and i + 1 < len(words) and words[i] not in ("--no-create-home", "--system"):
                options[words[i]] = words[i + 1]
                i += 2
            else:
                if not words[i].startswith("-"):
                    name = words[i]
                i += 1
        if words[0] == "groupadd" and "--gid" in options:
            group.append(f"{name}:x:{options['--gid']}:")
        elif words[0] == "useradd" and "--uid" in options:
            passwd.append(f"{name}:x:{options['--uid']}:{options.get('--gid', options['--uid'])}::"
                          f"{options.get('--home-dir', '/home/' + name)}:{options.get('--shell', '/bin/sh')}")
    return passwd, group


def _replace_paths(image: Image, paths: Mapping[str, str]) -> Image:
    def fix(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    return replace(image, env={k: fix(v) for k, v in image.env.items()}, workdir=fix(image.workdir),
                   entrypoint=[fix(a) for a in image.entrypoint], cmd=[fix(a) for a in image.cmd])
