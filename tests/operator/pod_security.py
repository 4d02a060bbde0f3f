"""The ``restricted`` Pod Security Standard (Kubernetes 1.37), as a pure check of a pod spec.

What the API server's PodSecurity admission enforces in a namespace labelled
``pod-security.kubernetes.io/enforce: restricted``: the ``baseline`` rules plus the
``restricted`` ones (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
:func:`restricted_violations` returns one line per broken rule, so a test can say which.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

Body = Mapping[str, Any]

#: Volume types the restricted profile allows.
ALLOWED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                             "projected", "secret"})
#: The only capability a container may add under the restricted profile.
ALLOWED_ADD = frozenset({"NET_BIND_SERVICE"})
#: Sysctls the baseline profile allows.
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                          "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                          "net.ipv4.tcp_keepalive_probes"})
#: SELinux types the baseline profile allows.
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_OK = frozenset({"RuntimeDefault", "Localhost"})
PROFILE_OK = frozenset({"RuntimeDefault", "Localhost"})


def containers(pod: Body) -> Iterator[tuple[str, Body]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(key) or []:
            yield f"{key}[{container.get('name', '?')}]", container


def restricted_violations(pod: Body, metadata: Body | None = None) -> list[str]:
    """The rules of the restricted profile that the pod spec `pod` (and its `metadata`) breaks."""
    out: list[str] = []
    pod_sc: Body = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {volume.get('name')} has type {sorted(kinds - ALLOWED_VOLUMES)}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')} is not safe")
    for annotation, value in ((metadata or {}).get("annotations") or {}).items():
        if annotation.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            out.append(f"AppArmor annotation {annotation}={value}")
    out += _context_violations("pod", pod_sc)
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type") in SECCOMP_OK
    for where, container in containers(pod):
        sc: Body = container.get("securityContext") or {}
        out += _context_violations(where, sc)
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"{where}: capabilities.drop does not hold ALL")
        added = set(capabilities.get("add") or []) - ALLOWED_ADD
        if added:
            out.append(f"{where}: adds capabilities {sorted(added)}")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            out.append(f"{where}: runAsNonRoot is not true")
        if not pod_seccomp and (sc.get("seccompProfile") or {}).get("type") not in SECCOMP_OK:
            out.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
    return out


def _context_violations(where: str, sc: Body) -> list[str]:
    """Rules that hold for the pod's and for each container's securityContext alike."""
    out = []
    if sc.get("runAsUser") == 0:
        out.append(f"{where}: runAsUser is 0")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{where}: windowsOptions.hostProcess")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_OK:
        out.append(f"{where}: seccompProfile {seccomp}")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in PROFILE_OK:
        out.append(f"{where}: appArmorProfile {apparmor}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        out.append(f"{where}: seLinuxOptions {dict(selinux)}")
    return out
