//! The deployment files, checked as far as this machine allows (no Docker engine, no helm):
//! every YAML and JSON file parses; `values.yaml` satisfies `values.schema.json`; and every
//! samgate subcommand, flag, environment variable and configuration key that the Dockerfile,
//! the compose stack and the Helm chart use is accepted by the binary itself.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use samgate::cli::Cli;
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
    let mut command = common::samgate_command();
    command.args(["check-config", "--config"]).arg(config);
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

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let exported: BTreeSet<String> = samgate::metrics::Metrics::new()
        .names()
        .into_iter()
        .collect();
    assert_eq!(exported.len(), 11);
    for file in [
        "helm/samgate/files/dashboard.json",
        "helm/samgate/files/alerts.yaml",
    ] {
        let text = read(file);
        for (i, _) in text.match_indices("samgate_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(base),
                "{file} uses {name}, which samgate does not export ({exported:?})"
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

#[test]
fn the_chart_runs_commands_and_configuration_the_binary_accepts() {
    let values = yaml("helm/samgate/values.yaml");
    // The ConfigMap is `config` as JSON (helm's toPrettyJson) in samgate.json; samgate must
    // accept every key of it, together with the variables the Deployment and the Secret set.
    let configmap = read("helm/samgate/templates/configmap.yaml");
    assert!(
        configmap.contains("samgate.json: |")
            && configmap.contains(".Values.config | toPrettyJson")
    );
    assert!(read("helm/samgate/templates/deployment.yaml").contains("/etc/samgate/samgate.json"));
    let config: Value = serde_json::to_value(&values["config"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("samgate.json");
    std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut env: Vec<(String, String)> = values["secret"]["env"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let deployment = read("helm/samgate/templates/deployment.yaml");
    for name in variables_in(&deployment) {
        if !env.iter().any(|(k, _)| *k == name) {
            // Values come from the chart's values; any well-formed one will do here.
            let value = match name.as_str() {
                "SAMGATE_LOG_FORMAT" => "json",
                "SAMGATE_LOG" => "info",
                _ => "samgate-7d9f8-abcde",
            };
            env.push((name, value.to_owned()));
        }
    }
    check_config(&file, &env);

    let mut names = BTreeSet::new();
    for template in files_under("helm/samgate/templates", &["yaml", "tpl", "txt"]) {
        let text = read(&template);
        names.extend(variables_in(&text));
        for line in text.lines() {
            if let Some(list) = line.trim().strip_prefix("args:") {
                let args: Vec<String> = serde_yaml::from_str(list).unwrap();
                parses(&args).unwrap();
            }
        }
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
                check_config(&root().join(host), &env);
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
