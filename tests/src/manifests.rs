//! The Kubernetes manifests (`packaging/kubernetes/*.yaml`) against the binaries they run and
//! against each other, as `kubectl apply` and the pods would meet them: every document is
//! well formed with its kind's required fields; workloads' selectors match their pods, every
//! volume mount names a volume, every `$(VAR)` a container uses is defined in its env, and every
//! container command parses with the real command line; the configs in the ConfigMaps parse as
//! the daemons' own config types (unknown keys rejected); the agents' supernode list, the
//! supernodes' `[cluster]` list and the StatefulSet's replicas name the same pods; Secrets the
//! pods mount are documented with the command that creates them; agents roll one node at a time
//! with time to stop gracefully.

use std::collections::BTreeSet;

use clap::Parser;
use yaml_rust2::{Yaml, YamlLoader};

const AGENTS: &str = include_str!("../../packaging/kubernetes/dfdaemon-daemonset.yaml");
const SUPERNODES: &str = include_str!("../../packaging/kubernetes/supernode-statefulset.yaml");

fn load(text: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(text).expect("manifest parses as YAML")
}

fn s<'a>(y: &'a Yaml, path: &[&str]) -> &'a str {
    at(y, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

fn at<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(y, |y, k| &y[*k])
}

fn list<'a>(y: &'a Yaml, path: &[&str]) -> Vec<&'a Yaml> {
    at(y, path)
        .as_vec()
        .map(|v| v.iter().collect())
        .unwrap_or_default()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// The one document of `kind` named `name`.
fn named<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| s(d, &["metadata", "name"]) == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Checks what every document and every workload needs; returns the pod spec of `kind`.
fn check_common<'a>(docs: &'a [Yaml], file: &str, kind: &str) -> &'a Yaml {
    for d in docs {
        for key in ["apiVersion", "kind"] {
            assert!(
                d[key].as_str().is_some(),
                "{file}: a document without {key}"
            );
        }
        assert!(
            d["metadata"]["name"].as_str().is_some(),
            "{file}: unnamed {:?}",
            d["kind"]
        );
        if d["kind"].as_str() != Some("Namespace") {
            assert_eq!(
                s(d, &["metadata", "namespace"]),
                "damselfly",
                "{file}: {:?}",
                d["kind"]
            );
        }
    }
    let workloads = of_kind(docs, kind);
    assert_eq!(workloads.len(), 1, "{file}: one {kind}");
    let w = workloads[0];
    let selector = at(w, &["spec", "selector", "matchLabels"]);
    let labels = at(w, &["spec", "template", "metadata", "labels"]);
    for (k, v) in selector.as_hash().expect("matchLabels") {
        assert_eq!(
            &labels[k.as_str().unwrap_or("")],
            v,
            "{file}: selector {k:?} not on the pods"
        );
    }
    let pod = at(w, &["spec", "template", "spec"]);
    let mut volumes: BTreeSet<&str> = list(pod, &["volumes"])
        .iter()
        .map(|v| s(v, &["name"]))
        .collect();
    volumes.extend(
        list(w, &["spec", "volumeClaimTemplates"])
            .iter()
            .map(|v| s(v, &["metadata", "name"])),
    );
    for v in list(pod, &["volumes"]) {
        if let Some(cm) = v["configMap"]["name"].as_str() {
            named(docs, "ConfigMap", cm);
        }
        if let Some(secret) = v["secret"]["secretName"].as_str() {
            assert!(
                [AGENTS, SUPERNODES]
                    .iter()
                    .any(|t| t.contains(&format!("create secret generic {secret}"))),
                "{file}: Secret {secret} is mounted but how to create it is not documented"
            );
        }
    }
    let containers = list(pod, &["containers"])
        .into_iter()
        .chain(list(pod, &["initContainers"]));
    for c in containers {
        let name = s(c, &["name"]);
        assert!(
            c["image"].as_str().is_some(),
            "{file}: container {name} has no image"
        );
        for m in list(c, &["volumeMounts"]) {
            let v = s(m, &["name"]);
            assert!(
                volumes.contains(v),
                "{file}: {name} mounts undeclared volume {v}"
            );
        }
        let env: BTreeSet<&str> = list(c, &["env"]).iter().map(|e| s(e, &["name"])).collect();
        for arg in list(c, &["command"]) {
            let arg = arg.as_str().expect("command words are strings");
            for var in arg
                .split("$(")
                .skip(1)
                .filter_map(|r| r.split_once(')'))
                .map(|(v, _)| v)
            {
                assert!(
                    env.contains(var),
                    "{file}: {name} uses $({var}), not in its env"
                );
            }
        }
    }
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    assert!(
        grace >= 30,
        "{file}: {grace} s is too short for a graceful stop"
    );
    pod
}

/// The command of container `name`, with `$(VAR)`s replaced by sample values.
fn command(pod: &Yaml, name: &str) -> Vec<String> {
    let c = list(pod, &["containers"])
        .into_iter()
        .chain(list(pod, &["initContainers"]))
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"));
    list(c, &["command"])
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap_or("")
                .replace("$(NODE_IP)", "10.0.0.7")
                .replace("$(NODE_NAME)", "node-7")
                .replace("$(POD_IP)", "10.1.0.3")
                .replace("$(POD_NAME)", "damselfly-supernode-0")
                .replace("$(DAMSELFLY_LOCATION)", "zone-a/rack-1")
        })
        .collect()
}

/// The scheduler addresses of the StatefulSet's pods.
fn supernode_pods(docs: &[Yaml]) -> Vec<String> {
    let sts = named(docs, "StatefulSet", "damselfly-supernode");
    let replicas = sts["spec"]["replicas"].as_i64().expect("replicas");
    let service = s(sts, &["spec", "serviceName"]);
    (0..replicas)
        .map(|i| format!("damselfly-supernode-{i}.{service}.damselfly.svc:8002"))
        .collect()
}

#[test]
fn the_agent_daemonset_runs_dfdaemon_as_configured_and_rolls_one_node_at_a_time() {
    let docs = load(AGENTS);
    let pod = check_common(&docs, "dfdaemon-daemonset.yaml", "DaemonSet");
    assert_eq!(
        pod["hostNetwork"].as_bool(),
        Some(true),
        "peers reach agents at the node's IP"
    );
    let ds = named(&docs, "DaemonSet", "damselfly-dfdaemon");
    assert_eq!(s(ds, &["spec", "updateStrategy", "type"]), "RollingUpdate");
    assert_eq!(
        at(
            ds,
            &["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"]
        )
        .as_i64(),
        Some(1)
    );
    let cfg = s(
        named(&docs, "ConfigMap", "damselfly-dfdaemon-config"),
        &["data", "dfdaemon.toml"],
    );
    let cfg: fetcher::cli::dfdaemon::DaemonConfig =
        toml::from_str(cfg).unwrap_or_else(|e| panic!("the agents' dfdaemon.toml: {e}"));
    assert_eq!(
        cfg.supernodes,
        supernode_pods(&load(SUPERNODES)),
        "agents list every supernode pod"
    );
    let run = command(pod, "dfdaemon");
    fetcher::cli::dfdaemon::Args::try_parse_from(&run)
        .unwrap_or_else(|e| panic!("dfdaemon {run:?}: {e}"));
    let certs = command(pod, "certificate");
    supernode::config::Args::try_parse_from(&certs)
        .unwrap_or_else(|e| panic!("supernode {certs:?}: {e}"));
    let run_dir = list(pod, &["volumes"])
        .into_iter()
        .find(|v| v["hostPath"]["path"].as_str() == Some("/run/damselfly"));
    assert!(
        run_dir.is_some(),
        "the agent socket is on the host, for dfsnapshotter and dfget"
    );
}

#[test]
fn the_supernode_statefulset_runs_supernodes_that_know_each_other() {
    let docs = load(SUPERNODES);
    let pod = check_common(&docs, "supernode-statefulset.yaml", "StatefulSet");
    let cfg = s(
        named(&docs, "ConfigMap", "damselfly-supernode-config"),
        &["data", "supernode.toml"],
    );
    let cfg: supernode::config::Config =
        toml::from_str(cfg).unwrap_or_else(|e| panic!("the supernodes' supernode.toml: {e}"));
    assert_eq!(
        cfg.cluster.supernodes,
        supernode_pods(&docs),
        "[cluster] names every pod"
    );
    let svc = named(&docs, "Service", "damselfly-supernode");
    assert_eq!(
        svc["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless: one name per pod"
    );
    let ports: BTreeSet<i64> = list(svc, &["spec", "ports"])
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    let want: BTreeSet<i64> = [cfg.grpc_addr.port(), cfg.http_addr.port()]
        .map(i64::from)
        .into();
    assert_eq!(ports, want, "the Service exposes the configured ports");
    for name in ["supernode", "certificate"] {
        let run = command(pod, name);
        supernode::config::Args::try_parse_from(&run)
            .unwrap_or_else(|e| panic!("{name}: supernode {run:?}: {e}"));
    }
}
