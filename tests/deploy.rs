//! The deployment files, checked as far as this machine allows (no Docker engine, no cluster),
//! with the tools `scripts/deploy-tools` caches: every YAML and JSON file parses;
//! `values.yaml` satisfies `values.schema.json`; the chart is linted and rendered by Helm's own
//! SDK and every manifest validates against the Kubernetes schemas (`scripts/render-chart.py`);
//! `docker-compose.yml` follows the Compose specification; the alert rules and the compose
//! Prometheus configuration pass promtool, and the alerts' unit tests run; every dashboard and
//! alert query is PromQL over exported metrics and labels; the Dockerfile's build context builds
//! the binary; and every samgate subcommand, flag, environment variable and configuration key
//! that the Dockerfile, the compose stack and the rendered chart use is accepted by the binary.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use samgate::cli::Cli;
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> serde_yaml::Value {
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
    value.apply_merge().unwrap();
    value
}

fn json(path: &str) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

fn files_under(dir: &str, extensions: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root().join(dir)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if extensions
                .iter()
                .any(|e| path.extension().is_some_and(|x| x == *e))
            {
                let relative = path.strip_prefix(root()).unwrap();
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// `samgate ARGS…` as clap sees it, or the reason it is refused.
fn parses(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("samgate".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv)
        .map(|_| ())
        .map_err(|e| format!("samgate {}: {e}", args.join(" ")))
}

/// Every environment variable a flag of any subcommand reads.
fn flag_variables() -> BTreeSet<String> {
    fn walk(command: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&Cli::command(), &mut out);
    out
}

/// `SAMGATE_…` names in `text`.
fn variables_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("SAMGATE_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.ends_with('_') {
            out.insert(name); // (a bare `SAMGATE_` prefix in prose is not a name)
        }
    }
    out
}

/// `samgate check-config` with `config` and `env` must accept both.
fn check_config(config: &Path, env: &[(String, String)]) {
    check_config_as(config, env, &[]);
}

/// check-config with `flags` (`--feed`: as `samgate feed` reads it).
fn check_config_as(config: &Path, env: &[(String, String)], flags: &[&str]) {
    let mut command = common::samgate_command();
    command
        .args(["check-config", "--config"])
        .arg(config)
        .args(flags);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "check-config refused {} with {env:?}: {}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Variable names with `__` are configuration paths (checked by check-config); the others must
/// be flags' variables.
fn assert_known_variables(file: &str, names: &BTreeSet<String>) {
    let flags = flag_variables();
    for name in names {
        assert!(
            name.contains("__") || flags.contains(name),
            "{file} uses {name}, which no samgate flag reads"
        );
    }
}

#[test]
fn every_yaml_and_json_file_parses() {
    let mut checked = 0;
    for file in ["docker-compose.yml"]
        .into_iter()
        .map(String::from)
        .chain(files_under("deploy", &["yml", "yaml"]))
        .chain(files_under("helm/samgate", &["yaml", "yml"]))
    {
        if file.contains("/templates/") {
            continue; // Go templates, not YAML until helm renders them
        }
        yaml(&file);
        checked += 1;
    }
    for file in files_under("helm/samgate", &["json"]) {
        json(&file);
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} files found");

    let dashboard = json("helm/samgate/files/dashboard.json");
    let panels = dashboard["panels"].as_array().unwrap();
    let text = dashboard.to_string();
    for metric in [
        "samgate_decisions_total",
        "samgate_detection_to_enforcement_seconds_bucket",
        "samgate_firewall_api_requests_total",
        "samgate_firewall_logins_total",
        "samgate_consumer_lag_messages",
        "samgate_active_blocks",
        "samgate_dead_letters_total",
    ] {
        assert!(text.contains(metric), "the dashboard has no {metric} panel");
    }
    assert!(panels.len() >= 7);
    let alerts = yaml("helm/samgate/files/alerts.yaml");
    let names: Vec<&str> = alerts["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for alert in [
        "SamgateEnforcementFailing",
        "SamgateConsumerLagGrowing",
        "SamgateDeadLettersGrowing",
        "SamgateLoginsRefused",
        "SamgateNoEventsFromSite",
    ] {
        assert!(names.contains(&alert), "no {alert} in {names:?}");
    }
}

/// Every PromQL expression of the dashboard and the alert rules, with where it is.
fn promql_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dashboard = json("helm/samgate/files/dashboard.json");
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let place = format!("dashboard panel {:?}", panel["title"]);
            out.push((place, target["expr"].as_str().unwrap().to_owned()));
        }
    }
    let alerts = yaml("helm/samgate/files/alerts.yaml");
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let place = format!("alert {:?}", rule["alert"].as_str().unwrap());
            out.push((place, rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// The series selectors of a PromQL expression (metric name, label names in its matchers) and
/// the label names it groups by.
#[derive(Default)]
struct Selections {
    selectors: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

impl promql_parser::util::ExprVisitor for Selections {
    type Error = String;

    fn pre_visit(&mut self, expr: &promql_parser::parser::Expr) -> Result<bool, String> {
        use promql_parser::parser::Expr;
        let selector = match expr {
            Expr::VectorSelector(selector) => selector,
            Expr::MatrixSelector(matrix) => &matrix.vs,
            Expr::Aggregate(aggregate) => {
                if let Some(modifier) = &aggregate.modifier {
                    self.grouping
                        .extend(modifier.labels().labels.iter().cloned());
                }
                return Ok(true);
            }
            _ => return Ok(true),
        };
        let name = selector
            .name
            .clone()
            .ok_or("a selector without a metric name")?;
        let labels = selector
            .matchers
            .matchers
            .iter()
            .map(|m| m.name.clone())
            .collect();
        self.selectors.push((name, labels));
        Ok(true)
    }
}

#[test]
fn every_dashboard_and_alert_query_is_promql_over_exported_metrics_and_labels() {
    let catalogue = samgate::metrics::Metrics::new().catalogue();
    assert_eq!(catalogue.len(), 35);
    let expressions = promql_expressions();
    assert!(
        expressions.len() >= 20,
        "only {} expressions",
        expressions.len()
    );
    for (place, expr) in expressions {
        // Grafana's interval variables stand for a duration.
        let query = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m");
        let parsed = promql_parser::parser::parse(&query)
            .unwrap_or_else(|e| panic!("{place}: {expr:?} is not PromQL: {e}"));
        let mut found = Selections::default();
        promql_parser::util::walk_expr(&mut found, &parsed)
            .unwrap_or_else(|e| panic!("{place}: {expr:?}: {e}"));
        assert!(
            !found.selectors.is_empty(),
            "{place}: {expr:?} selects nothing"
        );
        // Prometheus adds the target labels `instance` and `job` to every series it scrapes.
        let mut labels_in_scope = BTreeSet::from(["le", "instance", "job"].map(str::to_owned));
        for (name, matched) in &found.selectors {
            // A histogram's series: NAME_bucket (with `le`), NAME_sum, NAME_count.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| catalogue.iter().any(|(n, _)| n == base))
                .unwrap_or(name);
            let (_, labels) = catalogue
                .iter()
                .find(|(n, _)| n == base)
                .unwrap_or_else(|| panic!("{place} uses {name}, which samgate does not export"));
            for label in matched {
                assert!(
                    labels.contains(label) || (label == "le" && name.ends_with("_bucket")),
                    "{place}: {name} has no label {label:?} (it has {labels:?})"
                );
            }
            labels_in_scope.extend(labels.iter().cloned());
        }
        for label in &found.grouping {
            assert!(
                labels_in_scope.contains(label),
                "{place}: groups by {label:?}, which none of its metrics has"
            );
        }
    }
}

#[test]
fn values_yaml_satisfies_values_schema_json() {
    let schema = json("helm/samgate/values.schema.json");
    let values: Value = serde_json::to_value(yaml("helm/samgate/values.yaml")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&values)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");

    // The schema has teeth: a typo'd key and a bad value are refused.
    let mut typo = values.clone();
    typo["replicaCuont"] = 2.into();
    assert!(!validator.is_valid(&typo));
    let mut bad = values.clone();
    bad["logFormat"] = "xml".into();
    assert!(!validator.is_valid(&bad));
}

/// Runs `command` and fails the test with its output unless it succeeds.
fn succeeds(mut command: std::process::Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let mut check = common::deploy_tool("promtool");
    check
        .args(["check", "rules"])
        .arg(root().join("helm/samgate/files/alerts.yaml"));
    succeeds(check);
    // tests/alerts/alerts.test.yaml: each alert fires on the series samgate exports when it
    // should, with its labels and annotations, and stays quiet when it should.
    let mut test = common::deploy_tool("promtool");
    test.args(["test", "rules"])
        .arg(root().join("tests/alerts/alerts.test.yaml"));
    succeeds(test);
}

#[test]
fn the_compose_prometheus_configuration_passes_promtool() {
    // Prometheus reads its rule files where compose mounts them: map each back to the repository.
    let compose = yaml("docker-compose.yml");
    let mounts: Vec<(String, String)> = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let mut parts = v.as_str().unwrap().split(':');
            let host = parts.next().unwrap().trim_start_matches("./").to_owned();
            (parts.next().unwrap().to_owned(), host)
        })
        .collect();
    let mut config = yaml("deploy/compose/prometheus.yml");
    let rule_files = config["rule_files"].as_sequence_mut().unwrap();
    assert!(!rule_files.is_empty());
    for file in rule_files.iter_mut() {
        let inside = file.as_str().unwrap().to_owned();
        let (_, host) = mounts
            .iter()
            .find(|(target, _)| *target == inside)
            .unwrap_or_else(|| panic!("{inside} is not mounted into the prometheus service"));
        *file = root().join(host).to_string_lossy().into_owned().into();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
    let mut check = common::deploy_tool("promtool");
    check.args(["check", "config"]).arg(&file);
    succeeds(check);
}

#[test]
fn docker_compose_yml_follows_the_compose_specification() {
    let check = |file: &Path| {
        let mut command = common::deploy_tool("check-jsonschema");
        command
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(file);
        command
    };
    succeeds(check(&root().join("docker-compose.yml")));
    // The schema has teeth: a misspelt service key is refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("docker-compose.yml");
    let text = read("docker-compose.yml");
    assert!(text.contains("    depends_on:"));
    std::fs::write(&bad, text.replacen("    depends_on:", "    depend_on:", 1)).unwrap();
    let output = check(&bad).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("depend_on"));
}

/// The CRD kinds the chart renders only when the cluster has them.
const MONITORING_CRDS: [&str; 2] = [
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
];

/// The chart as Helm renders it: `scripts/render-chart.py` lints it strictly, renders it with
/// `values` over the defaults (the chart's schema applies) and `api_versions` as the cluster's
/// capabilities, and validates every manifest against the Kubernetes schemas. Every rendered
/// object, or the script's complaint.
fn render_chart(values: Value, api_versions: &[&str]) -> Result<Vec<serde_yaml::Value>, String> {
    let out = tempfile::tempdir().unwrap();
    let mut command = common::deploy_tool("python");
    command
        .arg(root().join("scripts/render-chart.py"))
        .arg(root().join("helm/samgate"))
        .arg(out.path())
        .arg("--values")
        .arg(values.to_string());
    for api in api_versions {
        command.args(["--api-version", api]);
    }
    let output = command.output().unwrap();
    if !output.status.success() {
        return Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut objects = Vec::new();
    for file in std::fs::read_dir(out.path().join("samgate/templates")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let object = serde_yaml::Value::deserialize(document).unwrap();
                if !object.is_null() {
                    objects.push(object);
                }
            }
        }
    }
    Ok(objects)
}

fn kinds(objects: &[serde_yaml::Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn object<'a>(objects: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", kinds(objects)))
}

#[test]
fn the_chart_renders_valid_kubernetes_objects_for_its_settings() {
    // Defaults, on a cluster without the Prometheus operator: no ServiceMonitor, no rule.
    let objects = render_chart(Value::Null, &[]).unwrap();
    assert_eq!(
        kinds(&objects),
        BTreeSet::from(
            [
                "ConfigMap/samgate",
                "Deployment/samgate",
                "PodDisruptionBudget/samgate",
                "Secret/samgate",
                "Service/samgate",
            ]
            .map(String::from)
        )
    );
    let values = yaml("helm/samgate/values.yaml");
    let deployment = object(&objects, "Deployment", "samgate");
    assert_eq!(deployment["spec"]["replicas"], values["replicaCount"]);
    // samgate's drain fits the pod's grace period, both from one value.
    let shutdown = values["shutdownSeconds"].as_u64().unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap(),
        shutdown + 15
    );
    let config = object(&objects, "ConfigMap", "samgate");
    let samgate_json: Value =
        serde_json::from_str(config["data"]["samgate.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        samgate_json["run"]["shutdown_timeout"],
        format!("{shutdown}s")
    );

    // Everything on, on a cluster with the operator, credentials from an existing Secret.
    let objects = render_chart(
        serde_json::json!({
            "autoscaling": {"enabled": true},
            "grafanaDashboard": {"enabled": true},
            "secret": {"create": false, "existingSecret": "samgate-credentials"},
        }),
        &MONITORING_CRDS,
    )
    .unwrap();
    assert_eq!(
        kinds(&objects),
        BTreeSet::from(
            [
                "ConfigMap/samgate",
                "ConfigMap/samgate-dashboard",
                "Deployment/samgate",
                "HorizontalPodAutoscaler/samgate",
                "PodDisruptionBudget/samgate",
                "PrometheusRule/samgate",
                "Service/samgate",
                "ServiceMonitor/samgate",
            ]
            .map(String::from)
        )
    );
    let deployment = object(&objects, "Deployment", "samgate");
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        "samgate-credentials"
    );

    // The monitoring objects point at what the chart serves and carry the shared files.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = object(&objects, "Service", "samgate");
    let monitor = object(&objects, "ServiceMonitor", "samgate");
    for (key, value) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[key], value, "the Service selects the pods");
        assert_eq!(&service["metadata"]["labels"][key], value);
        assert_eq!(&monitor["spec"]["selector"]["matchLabels"][key], value);
    }
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(
        service_port["name"], port,
        "the ServiceMonitor scrapes the Service's port"
    );
    assert!(container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"] == service_port["targetPort"]));
    let rule = object(&objects, "PrometheusRule", "samgate");
    assert_eq!(rule["spec"], yaml("helm/samgate/files/alerts.yaml"));
    let dashboards = object(&objects, "ConfigMap", "samgate-dashboard");
    let (_, dashboard) = dashboards["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(dashboard.as_str().unwrap()).unwrap(),
        json("helm/samgate/files/dashboard.json")
    );

    // The chart's schema refuses what samgate would refuse at start.
    let refused = render_chart(serde_json::json!({"logFormat": "xml"}), &[]).unwrap_err();
    assert!(refused.contains("logFormat"), "{refused}");
}

#[test]
fn the_chart_runs_commands_and_configuration_the_binary_accepts() {
    let objects = render_chart(Value::Null, &[]).unwrap();
    let deployment = object(&objects, "Deployment", "samgate");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = serde_yaml::from_value(container["args"].clone()).unwrap();
    parses(&args).unwrap();

    // The configuration file the args name is the ConfigMap's key at the volume's mount path.
    let config_path = Path::new(&args[args.iter().position(|a| a == "--config").unwrap() + 1]);
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the config file is on a mounted volume");
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let configmap = object(
        &objects,
        "ConfigMap",
        volume["configMap"]["name"].as_str().unwrap(),
    );
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let config = configmap["data"][key]
        .as_str()
        .expect("the ConfigMap holds the file");

    // samgate accepts that file with the container's environment and the Secret's variables.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(key);
    std::fs::write(&file, config).unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        // A variable from the pod's own fields (its name) gets a well-formed stand-in.
        let value = var["value"]
            .as_str()
            .unwrap_or("samgate-7d9f8-abcde")
            .to_owned();
        env.push((name, value));
    }
    let secret = object(&objects, "Secret", "samgate");
    for (name, value) in secret["stringData"].as_mapping().unwrap() {
        env.push((
            name.as_str().unwrap().to_owned(),
            value.as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"], secret["metadata"]["name"],
        "the container reads the Secret"
    );
    check_config(&file, &env);

    let mut names: BTreeSet<String> = env.iter().map(|(name, _)| name.clone()).collect();
    for template in files_under("helm/samgate/templates", &["yaml", "tpl", "txt"]) {
        names.extend(variables_in(&read(&template)));
    }
    names.extend(variables_in(&read("helm/samgate/values.yaml")));
    assert_known_variables("helm/samgate", &names);
}

#[test]
fn compose_and_dockerfile_run_commands_and_configuration_the_binary_accepts() {
    let compose = yaml("docker-compose.yml");
    let mut commands = 0;
    for (name, service) in compose["services"].as_mapping().unwrap() {
        if service["image"].as_str() != Some("samgate:dev") {
            continue;
        }
        let name = name.as_str().unwrap();
        let command: Vec<String> = serde_yaml::from_value(service["command"].clone()).unwrap();
        if service["entrypoint"].is_null() {
            parses(&command).unwrap();
            commands += 1;
        } else {
            // A shell script: every `samgate …` line in it, with its loop variable filled in.
            let script = command
                .join("\n")
                .replace("\\\n", " ")
                .replace("$$site", "prague");
            for line in script.lines() {
                if let Some(rest) = line.split("/usr/local/bin/samgate ").nth(1) {
                    let words = shlex::split(rest.split(" < ").next().unwrap()).unwrap();
                    parses(&words).unwrap();
                    commands += 1;
                }
            }
        }
        // The config file it mounts, with the variables it sets.
        let env: Vec<(String, String)> = service["environment"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_owned(),
                    v.as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            if volume.ends_with("samgate.toml:ro") {
                let host = volume.split(':').next().unwrap();
                let flags: &[&str] = match command.first().map(String::as_str) {
                    Some("feed") => &["--feed"],
                    _ => &[],
                };
                check_config_as(&root().join(host), &env, flags);
            }
        }
        let text = serde_yaml::to_string(service).unwrap();
        assert_known_variables(
            &format!("docker-compose.yml service {name}"),
            &variables_in(&text),
        );
    }
    assert!(
        commands >= 3,
        "found {commands} samgate commands in compose"
    );

    let dockerfile = read("Dockerfile");
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD");
    parses(&serde_json::from_str::<Vec<String>>(cmd).unwrap()).unwrap();
    assert!(dockerfile.contains("\nUSER "), "the image runs as non-root");
}

#[test]
fn the_images_build_stage_has_what_the_binary_needs() {
    // The files the Dockerfile's build stage copies, and nothing else, must build `samgate`
    // with the locked dependencies (a checked build in a copy of that context).
    let dockerfile = read("Dockerfile");
    let build_stage = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.lines().next().unwrap_or("").ends_with(" AS build"))
        .expect("a stage named build");
    let context = tempfile::tempdir().unwrap();
    let mut copied = Vec::new();
    for line in build_stage.lines() {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = args.split_whitespace().collect();
        assert!(!words[0].starts_with("--from"), "{line}");
        for source in &words[..words.len() - 1] {
            let status = std::process::Command::new("cp")
                .arg("-r")
                .arg(root().join(source))
                .arg(context.path())
                .status()
                .unwrap();
            assert!(status.success(), "{line}: cannot copy {source}");
            copied.push(source.to_string());
        }
    }
    assert!(copied.contains(&"Cargo.lock".to_owned()), "{copied:?}");
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "check",
            "--locked",
            "--offline",
            "--quiet",
            "--bin",
            "samgate",
        ])
        .current_dir(context.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the build stage's context ({copied:?}) does not build samgate:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_chart_renders_fortigate_targets_with_their_tokens_from_the_secret() {
    // helm/samgate/ci/fortigate-values.yaml over the defaults: a site on Check Point and a
    // FortiGate's banned list, another on a FortiGate stitch.
    let overlay: Value =
        serde_json::to_value(yaml("helm/samgate/ci/fortigate-values.yaml")).unwrap();
    let objects = render_chart(overlay, &[]).unwrap();
    let configmap = object(&objects, "ConfigMap", "samgate");
    let text = configmap["data"]["samgate.json"].as_str().unwrap();
    let config: Value = serde_json::from_str(text).unwrap();
    assert_eq!(config["targets"]["brno-stitch"]["mode"], "webhook");
    assert_eq!(
        config["sites"]["prague"]["targets"],
        serde_json::json!(["prague-edge", "prague-fg"])
    );
    // The tokens are in the Secret, never in the ConfigMap; samgate accepts the pair.
    let secret = object(&objects, "Secret", "samgate");
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value) in secret["stringData"].as_mapping().unwrap() {
        let (name, value) = (name.as_str().unwrap(), value.as_str().unwrap());
        if name.starts_with("SAMGATE_FORTIGATE__DEVICES__") {
            assert!(!text.contains(value), "{name}'s value is in the ConfigMap");
        }
        env.push((name.to_owned(), value.to_owned()));
    }
    assert!(env
        .iter()
        .any(|(n, _)| n == "SAMGATE_FORTIGATE__DEVICES__FG_BRNO__TOKEN"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("samgate.json");
    std::fs::write(&file, text).unwrap();
    check_config(&file, &env);

    // The schema refuses what samgate would refuse, before anything is deployed.
    let device = serde_json::json!({"url": "https://fgt.example.net"});
    for (values, field) in [
        (
            serde_json::json!({"config": {"fortigate": {"devices": {"fg": {"url": "https://fgt.example.net", "token": "t"}}}}}),
            "token",
        ),
        (
            serde_json::json!({"config": {"fortigate": {"devices": {"fg": {"url": "https://fgt.example.net/?access_token=t"}}}}}),
            "url",
        ),
        (
            serde_json::json!({"config": {"fortigate": {"devices": {"fg-1": device}}}}),
            "fg-1",
        ),
        (
            serde_json::json!({"config": {"fortigate": {"devices": {"fg": device}},
            "targets": {"w": {"kind": "fortigate", "device": "fg", "mode": "webhook"}}}}),
            "stitch",
        ),
        (
            serde_json::json!({"config": {"fortigate": {"devices": {"fg": device}},
            "targets": {"w": {"kind": "fortigate", "device": "fg", "mode": "fw_samp"}}}}),
            "mode",
        ),
    ] {
        let refused = render_chart(values.clone(), &[]).unwrap_err();
        assert!(refused.contains(field), "{values}: {refused}");
    }
}

#[test]
fn the_chart_renders_the_feed_server_with_its_service_ingress_and_tls() {
    // helm/samgate/ci/feed-values.yaml over the defaults: a site on Check Point and a feed,
    // served over HTTPS through an Ingress.
    let overlay: Value = serde_json::to_value(yaml("helm/samgate/ci/feed-values.yaml")).unwrap();
    let objects = render_chart(overlay, &MONITORING_CRDS).unwrap();
    for kind in [
        "Deployment/samgate-feed",
        "Service/samgate-feed",
        "Ingress/samgate-feed",
        "ServiceMonitor/samgate-feed",
    ] {
        assert!(
            kinds(&objects).contains(kind),
            "{kind} in {:?}",
            kinds(&objects)
        );
    }
    let feed = object(&objects, "Deployment", "samgate-feed");
    let pipeline = object(&objects, "Deployment", "samgate");
    // Neither Deployment selects the other's pods.
    let selects = |d: &serde_yaml::Value, pods: &serde_yaml::Value| {
        let labels = &pods["spec"]["template"]["metadata"]["labels"];
        d["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(selects(feed, feed) && selects(pipeline, pipeline));
    assert!(!selects(feed, pipeline) && !selects(pipeline, feed));
    let container = &feed["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = serde_yaml::from_value(container["args"].clone()).unwrap();
    assert_eq!(args[0], "feed");
    parses(&args).unwrap();
    assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");

    // The configuration listens where the Service points, with the mounted certificate.
    let configmap = object(&objects, "ConfigMap", "samgate");
    let text = configmap["data"]["samgate.json"].as_str().unwrap();
    let config: Value = serde_json::from_str(text).unwrap();
    assert_eq!(config["feed"]["listen"], "0.0.0.0:9465");
    let cert = config["feed"]["tls"]["cert_file"].as_str().unwrap();
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "feed-tls")
        .unwrap();
    assert!(cert.starts_with(mount["mountPath"].as_str().unwrap()));
    let service = object(&objects, "Service", "samgate-feed");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "feed");
    assert_eq!(container["ports"][0]["containerPort"], 9465);
    let ingress = object(&objects, "Ingress", "samgate-feed");
    let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(path["path"], "/feeds");
    assert_eq!(path["backend"]["service"]["name"], "samgate-feed");

    // samgate accepts the file with the Secret's variables (the feed's password among them),
    // and the password is never in the ConfigMap.
    let secret = object(&objects, "Secret", "samgate");
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value) in secret["stringData"].as_mapping().unwrap() {
        let (name, value) = (name.as_str().unwrap(), value.as_str().unwrap());
        if name.starts_with("SAMGATE_TARGETS__") {
            assert!(!text.contains(value), "{name}'s value is in the ConfigMap");
        }
        env.push((name.to_owned(), value.to_owned()));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("samgate.json");
    std::fs::write(&file, text).unwrap();
    check_config(&file, &env);

    // The schema refuses a feed target with push settings, or a password in the values.
    for (values, field) in [
        (
            serde_json::json!({"config": {"targets": {"f": {"kind": "feed", "server": "hq"}}}}),
            "targets",
        ),
        (
            serde_json::json!({"config": {"targets": {"f": {"kind": "feed", "password": "p"}}}}),
            "targets",
        ),
        (
            serde_json::json!({"config": {"targets": {"f": {"kind": "feed", "pollers": {"other": "192.0.2.1"}}}}}),
            "'other'",
        ),
    ] {
        let refused = render_chart(values.clone(), &[]).unwrap_err();
        assert!(refused.contains(field), "{values}: {refused}");
    }
}
