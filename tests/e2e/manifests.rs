//! The Kubernetes manifests and the binary cannot drift apart: every command
//! line, environment variable, port and file path the manifests give a
//! MadTech container is one the binary accepts, and every kustomization lists
//! only files that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use madtech::MadtechConfig;
use madtech_common::config::{Sources, Validate, load};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn documents(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    YamlLoader::load_from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn strs(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn items(node: &Yaml) -> &[Yaml] {
    node.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// A value the manifests take from a Secret: a placeholder of the right
/// shape for the key.
fn placeholder(name: &str) -> String {
    if name.ends_with("URL") {
        "postgres://user@db:5432/db".into()
    } else {
        "/var/run/secrets/placeholder".into()
    }
}

struct Container {
    origin: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    ports: BTreeMap<String, i64>,
    probe_ports: Vec<i64>,
    mounts: Vec<String>,
}

/// Every MadTech container (and init container) of every workload in `k8s/base`.
fn madtech_containers() -> Vec<Container> {
    let mut files = Vec::new();
    yaml_files(&repo().join("k8s/base"), &mut files);
    let mut found = Vec::new();
    for file in files {
        for doc in documents(&file) {
            if !matches!(doc["kind"].as_str(), Some("Deployment" | "StatefulSet")) {
                continue;
            }
            let pod = &doc["spec"]["template"]["spec"];
            let volumes: BTreeSet<&str> = items(&pod["volumes"])
                .iter()
                .filter_map(|v| v["name"].as_str())
                .collect();
            for container in items(&pod["initContainers"])
                .iter()
                .chain(items(&pod["containers"]))
            {
                if container["image"].as_str() != Some("madtech") {
                    continue;
                }
                let origin = format!(
                    "{} / {}",
                    file.display(),
                    container["name"].as_str().unwrap_or("?")
                );
                let env = items(&container["env"])
                    .iter()
                    .map(|e| {
                        let name = e["name"].as_str().expect("env name").to_string();
                        let value = e["value"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| placeholder(&name));
                        (name, value)
                    })
                    .collect();
                let ports = items(&container["ports"])
                    .iter()
                    .map(|p| {
                        (
                            p["name"].as_str().expect("port name").to_string(),
                            p["containerPort"].as_i64().expect("port"),
                        )
                    })
                    .collect();
                let probe_ports = ["readinessProbe", "livenessProbe"]
                    .iter()
                    .filter_map(|probe| container[*probe]["grpc"]["port"].as_i64())
                    .collect();
                let mounts = items(&container["volumeMounts"])
                    .iter()
                    .map(|m| {
                        let name = m["name"].as_str().expect("mount name");
                        assert!(
                            volumes.contains(name),
                            "{origin}: mount of undeclared volume {name}"
                        );
                        m["mountPath"].as_str().expect("mount path").to_string()
                    })
                    .collect();
                found.push(Container {
                    origin,
                    args: strs(&container["args"]),
                    env,
                    ports,
                    probe_ports,
                    mounts,
                });
            }
        }
    }
    found
}

fn port_of(addr: SocketAddr) -> i64 {
    i64::from(addr.port())
}

#[test]
fn every_container_gets_a_command_line_environment_ports_and_files_the_binary_accepts() {
    let containers = madtech_containers();
    assert_eq!(
        containers.len(),
        10,
        "five components, each with a migration init container"
    );
    for c in &containers {
        madtech::cli::check_args(&c.args).unwrap_or_else(|err| panic!("{}: {err}", c.origin));
        let (command, component) = (c.args[0].as_str(), c.args[1].as_str());

        for name in c.env.keys() {
            assert!(
                name.starts_with("MADTECH_"),
                "{}: {name} is not a MadTech setting",
                c.origin
            );
        }
        let sources = Sources {
            file: None,
            environment: c.env.clone().into_iter().collect(),
        };
        let config: MadtechConfig = load(&sources, &serde_json::json!({}))
            .unwrap_or_else(|err| panic!("{}: {err}", c.origin));
        // `serve` needs the whole section; `migrate` only the database.
        let validated = match (command, component) {
            ("serve", "gateway") => config.gateway.validate(),
            ("serve", "profiles") => config.profiles.validate(),
            ("serve", "consent") => config.consent.validate(),
            ("serve", "segments") => config.segments.validate(),
            ("serve", "activation") => config.activation.validate(),
            ("migrate", "gateway") => config
                .gateway
                .audit_database
                .validate("gateway.audit_database"),
            ("migrate", "profiles") => config.profiles.database.validate(component),
            ("migrate", "consent") => config.consent.database.validate(component),
            ("migrate", "segments") => config.segments.database.validate(component),
            ("migrate", "activation") => config.activation.database.validate(component),
            other => panic!("{}: unexpected command {other:?}", c.origin),
        };
        validated.unwrap_or_else(|err| panic!("{}: {err}", c.origin));

        if command == "serve" {
            let listen = match component {
                "gateway" => config.gateway.listen,
                "profiles" => config.profiles.listen,
                "consent" => config.consent.listen,
                "segments" => config.segments.listen,
                _ => config.activation.listen,
            };
            assert_eq!(
                c.ports.get("grpc"),
                Some(&port_of(listen)),
                "{}: grpc port",
                c.origin
            );
            let metrics = config.metrics_listen.expect("metrics are served");
            assert_eq!(
                c.ports.get("metrics"),
                Some(&port_of(metrics)),
                "{}: metrics port",
                c.origin
            );
            assert_eq!(
                c.probe_ports,
                vec![port_of(listen); 2],
                "{}: probes",
                c.origin
            );
        }

        // Every file the configuration names lives on a mounted volume.
        for (name, value) in &c.env {
            if name.ends_with("_FILE") || name.ends_with("_DIR") || name.ends_with("FILE_ROOT") {
                assert!(
                    c.mounts.iter().any(|m| Path::new(value).starts_with(m)),
                    "{}: {name}={value} is not on a mounted volume",
                    c.origin
                );
            }
        }
    }
}

#[test]
fn services_point_at_ports_their_pods_declare() {
    let mut files = Vec::new();
    yaml_files(&repo().join("k8s/base"), &mut files);
    for file in files.iter().filter(|f| f.ends_with("service.yaml")) {
        let dir = file.parent().expect("dir");
        let deployment = documents(&dir.join("deployment.yaml")).remove(0);
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let declared: BTreeMap<&str, i64> = items(&container["ports"])
            .iter()
            .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_i64()?)))
            .collect();
        for service in documents(file) {
            let headless = service["spec"]["clusterIP"].as_str() == Some("None");
            for port in items(&service["spec"]["ports"]) {
                let target = port["targetPort"].as_str().expect("named target port");
                let Some(container_port) = declared.get(target) else {
                    panic!("{}: no container port {target}", file.display());
                };
                // Nothing translates a headless Service's port: callers
                // connect to the pod at the port they were given.
                if headless {
                    assert_eq!(
                        port["port"].as_i64(),
                        Some(*container_port),
                        "{}: a headless Service's port is the pod's",
                        file.display()
                    );
                }
            }
        }
    }
}

#[test]
fn every_component_calls_the_others_through_headless_services() {
    let mut files = Vec::new();
    yaml_files(&repo().join("k8s/base"), &mut files);
    let services: BTreeMap<String, Yaml> = files
        .iter()
        .filter(|f| f.ends_with("service.yaml"))
        .flat_map(|f| documents(f))
        .map(|doc| {
            (
                doc["metadata"]["name"].as_str().expect("name").to_string(),
                doc,
            )
        })
        .collect();
    // The URLs components call each other at: the gateway's four
    // upstreams, segments' and consent's profiles, consent's and
    // activation's gateway.
    let urls: Vec<(String, String)> = madtech_containers()
        .into_iter()
        .flat_map(|c| c.env)
        .filter(|(name, _)| name.ends_with("_URL") || name.contains("__UPSTREAMS__"))
        .filter(|(name, _)| !name.contains("DATABASE"))
        .collect();
    assert_eq!(urls.len(), 8, "{urls:?}");
    for (name, url) in urls {
        let host = url
            .trim_start_matches("http://")
            .split(':')
            .next()
            .expect("host");
        let service = services
            .get(host)
            .unwrap_or_else(|| panic!("{name}: no Service {host}"));
        // A client spreads its calls over the addresses a name resolves
        // to; a virtual IP would give it one.
        assert_eq!(
            service["spec"]["clusterIP"].as_str(),
            Some("None"),
            "{name}: {host} must be headless"
        );
    }
}

#[test]
fn every_kustomization_lists_only_files_that_exist() {
    let mut files = Vec::new();
    yaml_files(&repo().join("k8s"), &mut files);
    files.push(repo().join("policies/kustomization.yaml"));
    let kustomizations: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.ends_with("kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 9);
    for file in kustomizations {
        let dir = file.parent().expect("dir");
        let doc = documents(file).remove(0);
        let mut listed = strs(&doc["resources"]);
        listed.extend(
            items(&doc["patches"])
                .iter()
                .filter_map(|p| p["path"].as_str().map(str::to_string)),
        );
        for generator in items(&doc["configMapGenerator"])
            .iter()
            .chain(items(&doc["secretGenerator"]))
        {
            listed.extend(strs(&generator["files"]));
        }
        for entry in listed {
            assert!(
                dir.join(&entry).exists(),
                "{} lists {entry}, which does not exist",
                file.display()
            );
        }
    }
}
