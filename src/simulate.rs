//! `samgate simulate …`: the simulators of `samgate-sim` as lab servers, each printing where it
//! listens, its credentials and its certificate's fingerprint, until Ctrl-C or SIGTERM.

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::shutdown_signal;

#[derive(Debug, Subcommand)]
pub enum Simulate {
    /// A Check Point management server with gateways (HTTPS, self-signed; prints its fingerprint).
    Checkpoint(SimulateCheckpointArgs),
    /// A FortiGate's REST API: banned-IP list, automation-stitch webhooks (HTTPS, self-signed).
    Fortigate(SimulateFortigateArgs),
    /// The part of Flowmon's REST API the shim reads: OAuth token, ADS event with its MAC.
    Flowmon(SimulateFlowmonArgs),
}

#[derive(Debug, Args)]
pub struct SimulateCheckpointArgs {
    /// Address to listen on.
    #[arg(long, env = "SAMGATE_SIM_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long, env = "SAMGATE_SIM_HTTP")]
    pub http: bool,
    /// A gateway name (repeat for several).
    #[arg(long = "gateway", env = "SAMGATE_SIM_GATEWAYS", value_delimiter = ',', default_values_t = vec!["gw-1".to_string(), "gw-2".to_string()])]
    pub gateways: Vec<String>,
    /// Administrator name.
    #[arg(long, env = "SAMGATE_SIM_USER", default_value = "admin")]
    pub user: String,
    /// Administrator password.
    #[arg(long, env = "SAMGATE_SIM_PASSWORD", default_value = "admin123")]
    pub password: String,
    /// API key accepted at login (default: a random one, printed at start).
    #[arg(long, env = "SAMGATE_SIM_API_KEY")]
    pub api_key: Option<String>,
    /// API version announced at login.
    #[arg(long, env = "SAMGATE_SIM_API_VERSION", default_value = "1.8")]
    pub api_version: String,
    /// How long each run-script task stays in progress at the least (the API and agent
    /// overhead: the firewall model's base).
    #[arg(long, env = "SAMGATE_SIM_TASK_DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
    pub task_duration: Duration,
    /// The firewall model: what each `fw` / `fw6` process a script starts adds to its task
    /// (one per `fw sam` rule; one per `fw samp batch`). An assumption (docs/checkpoint.md).
    #[arg(long, env = "SAMGATE_SIM_PROCESS_COST", value_parser = humantime::parse_duration, default_value = "40ms")]
    pub process_cost: Duration,
    /// The firewall model: what each line a `fw samp batch` reads adds to its task.
    #[arg(long, env = "SAMGATE_SIM_BATCH_LINE_COST", value_parser = humantime::parse_duration, default_value = "500us")]
    pub batch_line_cost: Duration,
    /// The firewall model: how many scripts a gateway works on at once (0: no limit).
    #[arg(long, env = "SAMGATE_SIM_GATEWAY_CORES", default_value_t = 2)]
    pub gateway_cores: u32,
    /// Latency added to every API answer.
    #[arg(long, env = "SAMGATE_SIM_LATENCY", value_parser = humantime::parse_duration, default_value = "0ms")]
    pub latency: Duration,
    /// Logins allowed per minute per administrator and domain.
    #[arg(long, env = "SAMGATE_SIM_LOGINS_PER_MINUTE", default_value_t = 3)]
    pub logins_per_minute: u32,
    /// Most concurrent sessions.
    #[arg(long, env = "SAMGATE_SIM_MAX_SESSIONS", default_value_t = 100)]
    pub max_sessions: usize,
    /// HTTP status of a login refused by the login limit.
    #[arg(long, env = "SAMGATE_SIM_LOGIN_LIMIT_STATUS", default_value_t = 429)]
    pub login_limit_status: u16,
    /// Fault: end every task with this status (`failed`, `partially succeeded`).
    #[arg(long, env = "SAMGATE_SIM_TASK_STATUS")]
    pub task_status: Option<String>,
    /// Fault: answer the first N calls with an HTML 502.
    #[arg(long, env = "SAMGATE_SIM_HTML_502", default_value_t = 0)]
    pub html_502: u32,
    /// Fault: answer the first N calls with HTTP 500.
    #[arg(long, env = "SAMGATE_SIM_HTTP_500", default_value_t = 0)]
    pub http_500: u32,
}

#[derive(Debug, Args)]
pub struct SimulateFortigateArgs {
    /// Address to listen on.
    #[arg(long, env = "SAMGATE_SIM_FG_LISTEN", default_value = "127.0.0.1:8444")]
    pub listen: std::net::SocketAddr,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long, env = "SAMGATE_SIM_FG_HTTP")]
    pub http: bool,
    /// The REST API administrator's key (default: a random one, printed at start).
    #[arg(long, env = "SAMGATE_SIM_FG_TOKEN")]
    pub token: Option<String>,
    /// A VDOM (repeat for several); the first is used when a call names none.
    #[arg(long = "vdom", env = "SAMGATE_SIM_FG_VDOMS", value_delimiter = ',', default_values_t = vec!["root".to_string()])]
    pub vdoms: Vec<String>,
    /// A network the administrator may call from (repeat for several).
    #[arg(long = "trusted-host", env = "SAMGATE_SIM_FG_TRUSTED_HOSTS", value_delimiter = ',', default_values = ["127.0.0.0/8", "::1/128"])]
    pub trusted_hosts: Vec<ipnet::IpNet>,
    /// Accept `?access_token=` (FortiOS 7.4.5+ refuses it by default).
    #[arg(long, env = "SAMGATE_SIM_FG_ALLOW_TOKEN_IN_URL")]
    pub allow_token_in_url: bool,
    /// What a reboot keeps of the banned list: disabled, permanent-only or all.
    #[arg(long, env = "SAMGATE_SIM_FG_PERSISTENCY", default_value = "disabled")]
    pub persistency: samgate_sim::fortigate::Persistency,
    /// An incoming-webhook stitch, `NAME` (records calls) or `NAME=BAN_SECONDS` (IP Ban of
    /// `srcip`, 0 = indefinite); repeat for several.
    #[arg(long = "stitch", env = "SAMGATE_SIM_FG_STITCHES", value_delimiter = ',', value_parser = parse_stitch)]
    pub stitches: Vec<samgate_sim::fortigate::Stitch>,
    /// Latency added to every API answer.
    #[arg(long, env = "SAMGATE_SIM_FG_LATENCY", value_parser = humantime::parse_duration, default_value = "0ms")]
    pub latency: Duration,
}

/// `NAME` or `NAME=BAN_SECONDS`.
fn parse_stitch(text: &str) -> Result<samgate_sim::fortigate::Stitch, String> {
    let (name, ban_seconds) = match text.rsplit_once('=') {
        None => (text, None),
        Some((name, seconds)) => {
            let seconds = seconds.trim().parse::<u32>().map_err(|_| {
                format!("{text:?}: BAN_SECONDS must be a number of seconds (0 = indefinite)")
            })?;
            (name, Some(seconds))
        }
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{text:?}: a stitch needs a name"));
    }
    Ok(samgate_sim::fortigate::Stitch {
        name: name.to_owned(),
        ban_seconds,
    })
}

#[derive(Debug, Args)]
pub struct SimulateFlowmonArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "SAMGATE_SIM_FLOWMON_LISTEN",
        default_value = "127.0.0.1:8445"
    )]
    pub listen: std::net::SocketAddr,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long, env = "SAMGATE_SIM_FLOWMON_HTTP")]
    pub http: bool,
    /// REST API user.
    #[arg(long, env = "SAMGATE_SIM_FLOWMON_USER", default_value = "admin")]
    pub user: String,
    /// REST API password.
    #[arg(long, env = "SAMGATE_SIM_FLOWMON_PASSWORD", default_value = "admin")]
    pub password: String,
    /// An ADS event and its source's MAC address, `EVENT_ID=MAC` (repeat for several).
    #[arg(long = "mac", env = "SAMGATE_SIM_FLOWMON_MACS", value_delimiter = ',', value_parser = parse_mac)]
    pub macs: Vec<(String, String)>,
}

/// `EVENT_ID=MAC`.
fn parse_mac(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((id, mac)) if !id.trim().is_empty() => {
            Ok((id.trim().to_owned(), mac.trim().to_owned()))
        }
        _ => Err(format!(
            "{text:?}: use EVENT_ID=MAC, e.g. 1234=aa:bb:cc:dd:ee:ff"
        )),
    }
}

/// Runs the chosen simulator until a signal.
pub async fn run(simulate: Simulate) -> anyhow::Result<()> {
    match simulate {
        Simulate::Checkpoint(args) => checkpoint(args).await,
        Simulate::Fortigate(args) => fortigate(args).await,
        Simulate::Flowmon(args) => flowmon(args).await,
    }
}

async fn checkpoint(args: SimulateCheckpointArgs) -> anyhow::Result<()> {
    use samgate_sim::checkpoint::{self as simulator, Faults, SimulatorConfig};
    let defaults = SimulatorConfig::default();
    let config = SimulatorConfig {
        listen: args.listen,
        tls: !args.http,
        users: vec![(args.user.clone(), args.password.clone())],
        api_key: args.api_key.unwrap_or(defaults.api_key),
        gateways: args.gateways.clone(),
        api_version: args.api_version,
        max_sessions: args.max_sessions,
        logins_per_minute: args.logins_per_minute,
        login_limit_status: args.login_limit_status,
        task_duration: args.task_duration,
        model: simulator::FirewallModel {
            per_process: args.process_cost,
            per_batch_line: args.batch_line_cost,
            gateway_cores: args.gateway_cores,
        },
        kept_scripts: defaults.kept_scripts,
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            html_502_next: args.html_502,
            http_500_next: args.http_500,
            task_status: args.task_status,
            ..Faults::default()
        },
        clock: defaults.clock.clone(),
    };
    let running = simulator::start(config).await?;
    println!("Check Point management API simulator");
    println!("  web_api      {}/web_api", running.url);
    println!("  user         {} / {}", args.user, args.password);
    println!("  api-key      {}", running.api_key);
    println!("  gateways     {}", args.gateways.join(", "));
    println!(
        "  model        task = {} + {} per fw process + {} per fw samp batch line, {} scripts at once per gateway",
        humantime::format_duration(args.task_duration),
        humantime::format_duration(args.process_cost),
        humantime::format_duration(args.batch_line_cost),
        args.gateway_cores
    );
    if let Some(fp) = &running.fingerprint {
        println!("  fingerprint  SHA-256 {fp}");
    }
    println!(
        "  state        GET {}/sim/state   faults: POST {}/sim/faults",
        running.url, running.url
    );
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

async fn fortigate(args: SimulateFortigateArgs) -> anyhow::Result<()> {
    use samgate_sim::fortigate::{self as simulator, Faults, FortiGateConfig};
    let defaults = FortiGateConfig::default();
    let config = FortiGateConfig {
        listen: args.listen,
        tls: !args.http,
        token: args.token.unwrap_or(defaults.token.clone()),
        trusted_hosts: args.trusted_hosts.clone(),
        vdoms: args.vdoms.clone(),
        allow_token_in_url: args.allow_token_in_url,
        banned_ip_persistency: args.persistency,
        stitches: args.stitches.clone(),
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            ..Faults::default()
        },
        ..defaults
    };
    let running = simulator::start(config).await?;
    let list = format!("{}/api/v2/monitor/user/banned", running.url);
    let trusted: Vec<String> = args.trusted_hosts.iter().map(ToString::to_string).collect();
    println!("FortiGate REST API simulator");
    println!("  api          {}/api/v2", running.url);
    println!("  token        {}", running.token);
    println!("  vdoms        {}", args.vdoms.join(", "));
    println!("  trusted      {}", trusted.join(", "));
    println!("  persistency  {}", args.persistency);
    for stitch in &args.stitches {
        let action = match stitch.ban_seconds {
            Some(0) => "IP Ban of srcip, indefinite".to_owned(),
            Some(seconds) => format!("IP Ban of srcip for {seconds} s"),
            None => "records calls".to_owned(),
        };
        println!(
            "  stitch       {}/api/v2/monitor/system/automation-stitch/webhook/{} ({action})",
            running.url,
            stitch.name.replace(' ', "%20")
        );
    }
    if let Some(fp) = &running.fingerprint {
        println!("  fingerprint  SHA-256 {fp}");
    }
    // The certificate is self-signed and not written anywhere: curl needs -k; samgate pins the
    // fingerprint above instead.
    let insecure = if running.fingerprint.is_some() {
        "-k "
    } else {
        ""
    };
    println!(
        "  try          curl {insecure}-H 'Authorization: Bearer {}' {list}",
        running.token
    );
    println!(
        "  state        GET {}/sim/state   faults: POST {}/sim/faults",
        running.url, running.url
    );
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

async fn flowmon(args: SimulateFlowmonArgs) -> anyhow::Result<()> {
    use samgate_sim::flowmon::{self as simulator, FlowmonConfig, CLIENT_ID};
    let config = FlowmonConfig {
        listen: args.listen,
        tls: !args.http,
        users: vec![(args.user.clone(), args.password.clone())],
        events: args.macs.iter().cloned().collect(),
        ..FlowmonConfig::default()
    };
    let running = simulator::start(config).await?;
    let insecure = if running.fingerprint.is_some() {
        "-k "
    } else {
        ""
    };
    println!("Flowmon REST API simulator");
    println!("  token        POST {}/resources/oauth/token", running.url);
    println!("  events       GET {}/rest/ads/event/{{id}}", running.url);
    println!("  user         {} / {}", args.user, args.password);
    for (id, mac) in &args.macs {
        println!("  event        {id} -> {mac}");
    }
    if let Some(fp) = &running.fingerprint {
        println!("  fingerprint  SHA-256 {fp}");
    }
    println!(
        "  try          curl {insecure}-d grant_type=password -d client_id={CLIENT_ID} -d username={} -d password={} {}/resources/oauth/token",
        args.user, args.password, running.url
    );
    println!(
        "  state        GET {}/sim/state   faults: POST {}/sim/faults",
        running.url, running.url
    );
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}
