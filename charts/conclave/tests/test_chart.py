#!/usr/bin/env python3
"""Chart checks with the real Helm engine (helm-python-sdk, import helm_python).

    ~/.cache/conclave/venv/bin/python -m pytest charts/conclave/tests   # or run this file

Lints strictly, renders with default and scoped values, and checks what the chart installs:
security settings, least-privilege RBAC (exactly the rules the operator's code needs),
leader-election Lease access, CRDs identical to crds/, and a comment on every values key.
"""
import re
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (make deps creates the venv)")

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent

# Every rule the operator needs, and nothing more: (apiGroup, resource) -> verbs.
EXPECTED_RULES = {
    ("conclave.dev", "keymanagementservers"): {"get", "list", "watch", "patch"},
    ("conclave.dev", "meetingzones"): {"get", "list", "watch", "patch"},
    ("conclave.dev", "connectorpools"): {"get", "list", "watch", "patch"},
    ("conclave.dev", "keymanagementservers/status"): {"get", "patch"},
    ("conclave.dev", "meetingzones/status"): {"get", "patch"},
    ("conclave.dev", "connectorpools/status"): {"get", "patch"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "create", "delete"},
    ("", "pods"): {"list"},
    ("", "services/proxy"): {"get"},
    ("", "pods/proxy"): {"get"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def render(values=None, namespace="conclave-system"):
    out = helm.Chart.load(str(CHART)).render(values or {}, name="conclave", namespace=namespace, is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_lint_is_clean():
    report = helm.lint(str(CHART), {}, strict=True, namespace="conclave-system")
    problems = [m for m in report.get("messages", []) if m["severity"] >= 2] + report.get("errors", [])
    assert problems == []


def test_operator_deployment_is_restricted_and_leader_elected():
    docs, _ = render()
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "--leader-elect=true" in c["args"] and c["args"][0] == "run"
    assert "--lease-name=conclave" in c["args"]
    assert c["resources"]["requests"]["cpu"]
    assert {e["name"] for e in c["env"]} >= {"POD_NAME", "POD_NAMESPACE"}


def rules_of(role):
    got = {}
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                got.setdefault((g, res), set()).update(r["verbs"])
    return got


def test_rbac_is_exactly_what_the_operator_uses():
    docs, _ = render()
    (cr,) = by_kind(docs, "ClusterRole")
    assert rules_of(cr) == EXPECTED_RULES
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["subjects"][0]["name"] == "conclave" and crb["subjects"][0]["namespace"] == "conclave-system"
    (lease_role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader")]
    named = [r for r in lease_role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["conclave"], "verbs": ["get", "update"]}]


def test_watch_namespace_scopes_rbac_to_a_role():
    docs, _ = render({"watchNamespace": "team"})
    assert by_kind(docs, "ClusterRole") == []
    role = [r for r in by_kind(docs, "Role") if r["metadata"].get("namespace") == "team"]
    assert len(role) == 1 and rules_of(role[0]) == EXPECTED_RULES
    (dep,) = by_kind(docs, "Deployment")
    assert "--watch-namespace=team" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_leader_election_off_drops_the_lease_role():
    docs, _ = render({"leaderElection": {"enabled": False}, "replicaCount": 1})
    assert [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader")] == []


def test_values_schema_refuses_unknown_and_mistyped_values():
    for bad in ({"replicaCount": "two"}, {"nope": 1}, {"logFormat": "xml"}, {"certificates": {"lifetime": "soon"}}):
        with pytest.raises(Exception):
            render(bad)


def test_notes_and_network_policy():
    docs, out = render()
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "kubectl wait --for=condition=Ready" in notes
    (np,) = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert len(np["spec"]["egress"]) == 2, "API server and DNS only by default"
    kms = {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"protocol": "TCP", "port": 8443}]}
    docs, _ = render({"networkPolicy": {"extraEgress": [kms]}})
    (np,) = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["egress"][2] == kms


def test_chart_crds_are_the_generated_ones():
    for sub in ("", "pre-1.25"):
        files = sorted((REPO / "crds" / sub).glob("*.yaml"))
        assert len(files) == 3
        for f in files:
            assert (CHART / "files" / "crds" / sub / f.name).read_text() == f.read_text(), f.name


def test_crds_render_once_each_kept_on_uninstall_and_can_be_left_out():
    docs, _ = render()
    crds = by_kind(docs, "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "connectorpools.conclave.dev", "keymanagementservers.conclave.dev", "meetingzones.conclave.dev"]
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    docs, _ = render({"crds": {"install": False}})
    assert by_kind(docs, "CustomResourceDefinition") == []


def test_every_values_key_is_documented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            undocumented.append(m.group(2))
    # Groups (keys whose children are documented) may go without their own comment.
    groups = {"crds", "monitoring", "dashboards", "podMonitor", "prometheusRule", "labelValue", "image", "nodeImages", "leaderElection", "certificates", "serviceAccount", "metrics",
              "serviceMonitor", "networkPolicy", "podDisruptionBudget", "requests", "limits", "cpu", "memory"}
    assert [k for k in undocumented if k not in groups] == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_scoped_rbac_can_keep_ca_keys_in_the_release_namespace():
    docs, _ = render({"watchNamespace": "team"})
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-ca-keys")]
    assert role["metadata"]["namespace"] == "conclave-system"
    assert rules_of(role) == {("", "secrets"): {"get", "create"}}
    docs, _ = render()
    assert [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-ca-keys")] == []
