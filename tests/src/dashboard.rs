//! The Grafana dashboard (`packaging/grafana/damselfly.json`) against the exporters: every
//! metric a panel queries is one that supernode, dfdaemon or dfsnapshotter defines, with the
//! labels it groups by, so that a renamed metric breaks this test instead of a panel.

/// The exporters' metric definitions, where every name and label list is spelled out.
const DEFINITIONS: [&str; 3] = [
    include_str!("../../supernode/src/metrics.rs"),
    include_str!("../../fetcher/src/metrics.rs"),
    include_str!("../../snapshotter/src/metrics.rs"),
];

const DASHBOARD: &str = include_str!("../../packaging/grafana/damselfly.json");

/// Every `expr` of the dashboard's panels.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The metric names an expression names (histogram series as their histogram's name).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("damselfly_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The labels an expression groups by (`by (a, b)`).
fn by_labels(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .filter_map(|s| s.split_once(')'))
        .flat_map(|(l, _)| l.split(',').map(|x| x.trim().to_owned()))
        .filter(|l| !l.is_empty() && l != "le" && l != "instance")
        .collect()
}

#[test]
fn every_panel_queries_metrics_the_daemons_export() {
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64()), "duplicate panel id: {p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{p}");
    }
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(!all.is_empty());
    for e in &all {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{e} names no damselfly metric");
        for n in &names {
            assert!(
                DEFINITIONS.iter().any(|d| d.contains(&format!("\"{n}\""))),
                "{e}: no exporter defines {n}"
            );
        }
        for l in by_labels(e) {
            assert!(
                DEFINITIONS.iter().any(|d| d.contains(&format!("\"{l}\""))),
                "{e}: no exporter has the label {l}"
            );
        }
    }
    assert_eq!(
        metric_names("rate(damselfly_x_seconds_bucket[5m]) / damselfly_y"),
        vec!["damselfly_x_seconds", "damselfly_y"]
    );
    assert_eq!(by_labels("sum by (from, le) (x)"), vec!["from"]);
}
