//! `cargo xtask manifests`: validates deploy/kubernetes/ offline against the Kubernetes API
//! schemas, with PyPI's kubernetes-validate (pinned in xtask/kubernetes-validate.txt, installed
//! into a venv under target/). It ships the schemas of each Kubernetes release; the validation
//! runs in a network namespace of its own with nothing in it (`unshare --net`), so it cannot
//! reach anything even if it tried.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{run, succeeds, workspace_root};

/// Debian packages the venv needs.
pub const PACKAGES: &[&str] = &["python3-venv", "util-linux"];
/// The Kubernetes releases the manifests are checked against: the first with
/// `securityContext.appArmorProfile` (1.30) to the newest kubernetes-validate knows.
const KUBERNETES: &[&str] = &[
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];
const PINNED: &str = "kubernetes-validate==1.37.0";

fn venv() -> PathBuf {
    workspace_root().join("target/kubernetes-validate")
}

/// The venv with the pinned kubernetes-validate, made once and reused.
fn install() -> anyhow::Result<PathBuf> {
    let venv = venv();
    let bin = venv.join("bin/kubernetes-validate");
    let requirements = workspace_root().join("xtask/kubernetes-validate.txt");
    let pip = venv.join("bin/pip");
    let installed = Command::new(&pip)
        .args(["freeze", "--all"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == PINNED)
        });
    if bin.exists() && installed {
        return Ok(bin);
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    Ok(bin)
}

/// Checks kustomization.yaml (every manifest in the directory listed, every listed file
/// present, only the fields used here) and the DaemonSet's own consistency (the probes and the
/// scrape annotations name the port conntrace serves on); prints the resource files.
const CHECK: &str = r#"
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization", k
unknown = set(k) - {"apiVersion", "kind", "resources", "images"}
assert not unknown, f"kustomization.yaml: fields not checked here: {unknown}"
files = sorted(f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml")
assert sorted(k["resources"]) == files, f"kustomization resources {k['resources']} != {files}"
docs = {f: list(yaml.safe_load_all(open(os.path.join(d, f)))) for f in files}
ds = [x for f in files for x in docs[f] if x and x["kind"] == "DaemonSet"]
assert len(ds) == 1, "one DaemonSet"
pod = ds[0]["spec"]["template"]
c = pod["spec"]["containers"][0]
args = c["args"]
addr = args[args.index("--metrics-addr") + 1]
port = int(addr.rsplit(":", 1)[1])
assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port), "scrape port"
assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
    get = c[probe]["httpGet"]
    assert get["path"] == "/healthz" and get["port"] == port, (probe, get)
env = {e["name"]: e for e in c["env"]}
assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
assert pod["spec"]["hostPID"] and pod["spec"]["hostNetwork"]
assert {"operator": "Exists"} in pod["spec"]["tolerations"]
print("\n".join(files))
"#;

pub fn validate() -> anyhow::Result<()> {
    let dir = workspace_root().join("deploy/kubernetes");
    let bin = install()?;
    let python = venv().join("bin/python3");
    let out = Command::new(&python)
        .arg("-c")
        .arg(CHECK)
        .arg(&dir)
        .output()
        .context("run the kustomization check")?;
    if !out.status.success() {
        bail!(
            "deploy/kubernetes: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|f| dir.join(f))
        .collect();
    // An empty network namespace: the schemas must come from the package.
    let offline = succeeds(Command::new("unshare").args(["--net", "true"]));
    for version in KUBERNETES {
        let mut cmd = if offline {
            let mut c = Command::new("unshare");
            c.args(["--net", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        run(cmd
            .args(["--strict", "--kubernetes-version", version])
            .args(&files))?;
    }
    eprintln!(
        "xtask: deploy/kubernetes valid against Kubernetes {} to {} (strict{})",
        KUBERNETES[0],
        KUBERNETES[KUBERNETES.len() - 1],
        if offline { ", no network" } else { "" }
    );
    Ok(())
}
