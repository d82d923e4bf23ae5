//! The command line: subcommands, flags (each also a `SAMGATE_<FLAG>` variable), and the
//! tolerant reading of Flowmon ADS's `--name 'value'` parameters for `samgate shim`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};

use crate::config::Config;
use crate::logging::{self, LogFormat};
use crate::shim::{self, ShimOptions};
use crate::spool::{self, Captured, RawHeader};

/// samgate: Flowmon ADS detections to Check Point quarantines, through Kafka.
#[derive(Debug, Parser)]
#[command(name = "samgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SAMGATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `samgate=debug,rdkafka=warn`) [default: info; warn for demo].
    #[arg(long, global = true, env = "SAMGATE_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// See samgate work: in-process Kafka, Check Point and FortiGate simulators, ADS events from
    /// three sites, and a feed.
    #[cfg(feature = "simulators")]
    Demo(DemoArgs),
    /// Read Flowmon ADS events on stdin and publish them to Kafka (install this in ADS).
    Shim(ShimArgs),
    /// The enforcement pipeline: consume events, decide, block (Check Point, FortiGate, feeds),
    /// report.
    Run(RunArgs),
    /// Serve the block-list feeds (targets of kind = "feed") that gateways fetch, built from
    /// the whole state topic.
    Feed(ConfigArgs),
    /// Load and validate a configuration, then print it (secret values hidden).
    CheckConfig(CheckConfigArgs),
    /// Create the topics samgate uses (events, results, dead letters, the compacted state), if
    /// missing, with the configured partitions.
    CreateTopics(ConfigArgs),
    /// Block an address at a site's targets now (through the pipeline and its safety checks).
    Block(BlockArgs),
    /// Remove an address's rules from every gateway of a site's targets (optionally exempt it).
    Unblock(UnblockArgs),
    /// Exempt an address at a site: no automatic block until the exemption ends.
    Exempt(ExemptArgs),
    /// End an address's exemption at a site.
    Unexempt(OperatorArgs),
    /// List the blocks samgate holds (read from the state topic).
    Blocks(BlocksArgs),
    /// Explain an address: what samgate believes, what a detection would do now, last results.
    Explain(ExplainArgs),
    /// Compare the gateways with samgate's blocks now, and repair what drifted.
    Reconcile(ReconcileArgs),
    /// Run a simulator of a system samgate talks to.
    #[cfg(feature = "simulators")]
    #[command(subcommand)]
    Simulate(crate::simulate::Simulate),
}

/// What every operator command takes.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The site (`all`: every configured site).
    #[arg(long)]
    pub site: String,
    /// The address.
    pub ip: std::net::IpAddr,
    /// Why (shown in results and logs).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who (default: $USER).
    #[arg(long, env = "USER")]
    pub actor: Option<String>,
    /// How long to wait for the results.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub timeout: Duration,
    /// Print the results as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BlockArgs {
    #[command(flatten)]
    pub common: OperatorArgs,
    /// How long (default: the policy's first duration step).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct UnblockArgs {
    #[command(flatten)]
    pub common: OperatorArgs,
    /// Also exempt the address for this long (no automatic block meanwhile).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub exempt_for: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ExemptArgs {
    #[command(flatten)]
    pub common: OperatorArgs,
    /// How long.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub for_: Duration,
}

#[derive(Debug, Args)]
pub struct BlocksArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only this site.
    #[arg(long)]
    pub site: Option<String>,
    /// Include expired blocks (escalation history) and exemptions.
    #[arg(long)]
    pub all: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only this site (default: every site).
    #[arg(long)]
    pub site: Option<String>,
    /// The address.
    pub ip: std::net::IpAddr,
    /// How far back to look for results.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    pub since: Duration,
    /// How many results to show per site.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only this target.
    #[arg(long)]
    pub target: Option<String>,
    /// How long to wait for every replica's report.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    pub timeout: Duration,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. `30s`); default: run until Ctrl-C.
    #[arg(long, env = "SAMGATE_DEMO_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "SAMGATE_DEMO_LISTEN", default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
    /// Where the demo's block-list feed (`/feeds/estate`) and its `/metrics` are served.
    #[arg(
        long,
        env = "SAMGATE_DEMO_FEED_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub feed_listen: std::net::SocketAddr,
    /// Time between two rounds of ADS events.
    #[arg(long, env = "SAMGATE_DEMO_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Decide and report, but never call a firewall (overrides run.dry_run).
    #[arg(long, env = "SAMGATE_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check it as `samgate feed` reads it (the firewalls' credentials are not needed).
    #[arg(long)]
    pub feed: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Flags of `samgate shim`. ADS passes them as `--name 'value'`; empty values mean "not set" and
/// unknown names are ignored with a warning. Secrets and TLS settings belong in `--config`: ADS
/// parameters are visible in the process list.
#[derive(Debug, Args)]
pub struct ShimArgs {
    /// Kafka bootstrap servers (overrides kafka.brokers).
    #[arg(long, env = "SAMGATE_BROKERS")]
    pub brokers: Option<String>,
    /// Site name of this collector (overrides shim.site).
    #[arg(long, env = "SAMGATE_SITE")]
    pub site: Option<String>,
    /// Configuration file (TOML).
    #[arg(long, env = "SAMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Events topic (overrides kafka.topics.events).
    #[arg(long, env = "SAMGATE_TOPIC")]
    pub topic: Option<String>,
    /// Dead-letter topic (overrides kafka.topics.dlq).
    #[arg(long, env = "SAMGATE_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// Spool directory (overrides shim.spool_dir).
    #[arg(long, env = "SAMGATE_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Fallback spool directory, for when the spool's disk fails (overrides
    /// shim.fallback_spool_dir).
    #[arg(long, env = "SAMGATE_FALLBACK_SPOOL_DIR")]
    pub fallback_spool_dir: Option<PathBuf>,
    /// Delivery timeout, e.g. `10s` (overrides shim.delivery_timeout).
    #[arg(long, env = "SAMGATE_DELIVERY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Option<Duration>,
    /// Also append logs to this file (overrides shim.log_file).
    #[arg(long, env = "SAMGATE_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Deliver what earlier runs spooled and exit; reads no stdin.
    #[arg(long)]
    pub flush_spool: bool,
}

/// Entry point of the `samgate` binary.
pub fn main() -> ExitCode {
    let (args, warnings) = flowmon_args(std::env::args_os().collect());
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(dispatch(cli, warnings))
}

async fn dispatch(cli: Cli, warnings: Vec<String>) -> ExitCode {
    let log = cli.log.as_deref().unwrap_or(match cli.command {
        #[cfg(feature = "simulators")]
        Command::Demo(_) => "warn",
        _ => "info",
    });
    match cli.command {
        #[cfg(feature = "simulators")]
        Command::Demo(args) => {
            if let Err(e) = logging::init(cli.log_format, log, None) {
                return fail(&e.to_string());
            }
            let cancel = cancel_on_signal();
            let options = crate::demo::DemoOptions {
                duration: args.duration,
                listen: args.listen,
                feed_listen: args.feed_listen,
                interval: args.interval,
            };
            match crate::demo::run(options, cancel).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("demo: {e:#}")),
            }
        }
        Command::Shim(args) => run_shim(cli.log_format, log, args, warnings).await,
        Command::CheckConfig(args) => {
            let checked = match args.feed {
                true => {
                    Config::load(args.config.as_deref()).and_then(Config::validate_for_operator)
                }
                false => load_config(args.config.as_deref()),
            };
            match checked {
                Ok(config) => {
                    println!("{}", redacted_json(&config));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Run(args) => {
            let mut config = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            config.run.dry_run |= args.dry_run;
            let config = match config.validate() {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            if let Err(e) = logging::init(cli.log_format, log, None) {
                return fail(&e.to_string());
            }
            let cancel = cancel_on_signal();
            let stopped = exit_if_stopping_hangs(&cancel, config.run.shutdown_timeout + STOP_GRACE);
            let outcome = crate::pipeline::run(config, cancel, |_| {}).await;
            drop(stopped);
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("run: {e:#}")),
            }
        }
        Command::Feed(args) => {
            // The firewalls' credentials are `run`'s: a feed server never calls a firewall, so
            // its copy of the file may leave them out (as an operator's may).
            let loaded = Config::load(args.config.as_deref());
            let config = match loaded.and_then(Config::validate_for_operator) {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            if let Err(e) = logging::init(cli.log_format, log, None) {
                return fail(&e.to_string());
            }
            match crate::feed::run(config, cancel_on_signal(), |_| {}).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("feed: {e:#}")),
            }
        }
        Command::Block(args) => {
            operator_command(crate::command::Action::Block, args.common, |c| {
                c.duration_s = args.duration.map(|d| d.as_secs().max(1));
            })
            .await
        }
        Command::Unblock(args) => {
            operator_command(crate::command::Action::Unblock, args.common, |c| {
                c.exempt_for_s = args.exempt_for.map(|d| d.as_secs().max(1));
            })
            .await
        }
        Command::Exempt(args) => {
            operator_command(crate::command::Action::Exempt, args.common, |c| {
                c.exempt_for_s = Some(args.for_.as_secs().max(1));
            })
            .await
        }
        Command::Unexempt(args) => {
            operator_command(crate::command::Action::Unexempt, args, |_| {}).await
        }
        Command::Blocks(args) => blocks(args).await,
        Command::Explain(args) => explain(args).await,
        Command::Reconcile(args) => reconcile(args).await,
        #[cfg(feature = "simulators")]
        Command::Simulate(simulate) => {
            if let Err(e) = logging::init(cli.log_format, log, None) {
                return fail(&e.to_string());
            }
            match crate::simulate::run(simulate).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("simulator: {e:#}")),
            }
        }
        Command::CreateTopics(args) => {
            let config = match load_config(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            if let Err(e) = logging::init(cli.log_format, log, None) {
                return fail(&e.to_string());
            }
            // Every topic `samgate run` reads or writes, the compacted state topic included.
            let mut config = config;
            config.kafka.create_topics = true;
            match crate::pipeline::ensure_topics(&config).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
    }
}

/// What `samgate run` may take after `run.shutdown_timeout` to commit and leave its group. With
/// Kafka gone, librdkafka waits for a group coordinator without end (its commit, its close);
/// past this the process exits anyway, as a SIGKILL would end it, which loses nothing: the next
/// owner consumes the uncommitted events again and verifies half-done blocks on the gateways.
/// The Helm chart's grace period is 15 s longer than the drain.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Once `cancel` fires, a thread that ends the process (status 1) if the returned sender is not
/// dropped within `bound`: a stop that waits on an unreachable broker does not wait forever.
/// A thread of its own, so that a runtime thread blocked in librdkafka cannot hold it up.
fn exit_if_stopping_hangs(
    cancel: &tokio_util::sync::CancellationToken,
    bound: Duration,
) -> std::sync::mpsc::Sender<()> {
    let (stopped, wait) = std::sync::mpsc::channel::<()>();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        cancel.cancelled().await;
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(bound) {
                tracing::error!(
                    after_s = bound.as_secs(),
                    "still stopping: Kafka does not answer the final commit or the group's leave; \
                     exiting without them (the next owner consumes the uncommitted events again)"
                );
                std::process::exit(1);
            }
        });
    });
    stopped
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received");
        on_signal.cancel();
    });
    cancel
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// block / unblock / exempt / unexempt: one command per site, then their results.
async fn operator_command(
    action: crate::command::Action,
    args: OperatorArgs,
    fill: impl Fn(&mut crate::command::Command),
) -> ExitCode {
    use crate::operator;
    let config = match operator_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let sites = match operator::sites(&config, &args.site) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    let mut commands = Vec::new();
    for site in sites {
        let mut command = crate::command::Command::new(action);
        command.site = Some(site);
        command.ip = Some(args.ip.to_canonical());
        command.reason = args.reason.clone();
        command.actor = args.actor.clone();
        fill(&mut command);
        match command.checked() {
            Ok(c) => commands.push(c),
            Err(e) => return fail(&e.to_string()),
        }
    }
    let (results, complete) = match operator::send_commands(&config, commands, args.timeout).await {
        Ok(r) => r,
        Err(e) => return fail(&format!("{e:#}")),
    };
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r).expect("results serialize"));
        }
    } else {
        print!("{}", operator::results_table(&results).render());
    }
    if !complete {
        return fail(&format!(
            "not every result arrived within {} (is `samgate run` consuming {}?); the command stays queued and will be carried out",
            humantime::format_duration(args.timeout),
            config.kafka.topics.events
        ));
    }
    if let Some(r) = results.iter().find(|r| operator::refused(r)) {
        return fail(&format!(
            "{} at {}: {} ({})",
            r.ip,
            r.target.as_deref().unwrap_or(&r.site),
            r.outcome.as_str(),
            r.reason
        ));
    }
    ExitCode::SUCCESS
}

async fn blocks(args: BlocksArgs) -> ExitCode {
    let config = match operator_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(site) = &args.site {
        if let Err(e) = crate::operator::sites(&config, site) {
            return fail(&e.to_string());
        }
    }
    let view = match crate::operator::state_view(&config).await {
        Ok(v) => v,
        Err(e) => return fail(&format!("{e:#}")),
    };
    let now = chrono::Utc::now();
    if args.json {
        for (_, record) in view.blocks.values() {
            let shown = args.site.as_ref().is_none_or(|s| *s == record.site)
                && (args.all || crate::operator::status(record, now) != "expired");
            if shown {
                println!(
                    "{}",
                    serde_json::to_string(record).expect("records serialize")
                );
            }
        }
        if args.all {
            for e in view.exemptions.values() {
                if args.site.as_ref().is_none_or(|s| *s == e.site) {
                    println!("{}", serde_json::to_string(e).expect("records serialize"));
                }
            }
        }
    } else {
        let table = crate::operator::blocks_table(&view, args.site.as_deref(), args.all, now);
        print!("{}", table.render());
    }
    ExitCode::SUCCESS
}

async fn explain(args: ExplainArgs) -> ExitCode {
    let config = match operator_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let explained = crate::operator::explain(
        &config,
        args.site.as_deref(),
        args.ip,
        args.since,
        args.last,
    )
    .await;
    match explained {
        Ok(all) => {
            for e in &all {
                match args.json {
                    true => println!("{}", serde_json::to_string(e).expect("serializes")),
                    false => print!("{}", crate::operator::render_explanation(e)),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{e:#}")),
    }
}

async fn reconcile(args: ReconcileArgs) -> ExitCode {
    let config = match operator_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let actor = std::env::var("USER").ok();
    let done =
        crate::operator::reconcile(&config, args.target.as_deref(), actor, args.timeout).await;
    let (reports, complete) = match done {
        Ok(r) => r,
        Err(e) => return fail(&format!("{e:#}")),
    };
    if args.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r).expect("reports serialize"));
        }
    } else {
        print!("{}", crate::operator::reconcile_table(&reports).render());
    }
    if !complete {
        return fail(&format!(
            "not every partition's owner answered within {} (is `samgate run` consuming?)",
            humantime::format_duration(args.timeout)
        ));
    }
    match reports.iter().find(|r| !r.errors.is_empty()) {
        Some(r) => fail(&format!(
            "{}: some gateways could not be listed: {}",
            r.target,
            r.errors.join("; ")
        )),
        None => ExitCode::SUCCESS,
    }
}

/// The configuration as the operator's commands read it (no firewall credentials needed).
fn operator_config(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigError> {
    Config::load(path)?.validate_for_operator()
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigError> {
    Config::load(path)?.validate()
}

/// The effective configuration as JSON, with every librdkafka property value hidden.
fn redacted_json(config: &Config) -> String {
    let mut config = config.clone();
    for value in config.kafka.properties.values_mut() {
        *value = "***".into();
    }
    serde_json::to_string_pretty(&config).expect("config serializes")
}

/// A shim run: the input first, into the spool, before anything that could fail on a mistake
/// (configuration, log filter, log file); then the configuration; then delivery.
async fn run_shim(
    log_format: LogFormat,
    log_filter: &str,
    args: ShimArgs,
    warnings: Vec<String>,
) -> ExitCode {
    let collector = gethostname::gethostname().to_string_lossy().into_owned();
    let dirs = early_spool_dirs(&args);
    let header = RawHeader {
        received_at: chrono::Utc::now(),
        collector: collector.clone(),
        site: nonempty(&args.site),
        events_topic: nonempty(&args.topic),
        dlq_topic: nonempty(&args.dlq_topic),
    };
    let (captured, failures, read_error) = if args.flush_spool {
        (Captured::Empty, Vec::new(), None)
    } else {
        let (dirs, header) = (dirs.clone(), header.clone());
        tokio::task::spawn_blocking(move || spool::capture(&dirs, &header, std::io::stdin().lock()))
            .await
            .expect("capture task panicked")
    };
    let options = shim_options(&args, dirs, collector);
    let log_file = options.as_ref().ok().and_then(|(_, file)| file.clone());
    init_shim_logging(log_format, log_filter, log_file.as_deref());
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let memory = report_capture(captured, &failures, read_error.as_ref());
    let options = match options {
        Ok((options, _)) => options,
        Err(e) if memory.is_some() => {
            return fail(&format!(
                "{e} (and no spool directory could keep this run's input: it is lost)"
            ))
        }
        Err(e) => {
            return fail(&format!(
                "{e} (this run's input is spooled; a run with a good configuration delivers it)"
            ))
        }
    };
    let memory = memory.map(|bytes| (header, bytes));
    let report = shim::deliver(&options, memory).await;
    tracing::info!(
        site = options.site,
        lines = report.lines,
        events = report.events,
        dead_letters = report.dead_letters,
        cut = report.cut,
        delivered = report.delivered,
        refused = report.refused,
        spooled = report.spooled,
        lost = report.lost,
        "shim run finished"
    );
    match report.lost {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Logging as configured, or to stderr alone when the filter or the file is unusable (said so):
/// the input is spooled already, and delivery goes on.
fn init_shim_logging(format: LogFormat, filter: &str, file: Option<&std::path::Path>) {
    let Err(first) = logging::init(format, filter, file) else {
        return;
    };
    let retry =
        logging::init(format, filter, None).or_else(|_| logging::init(format, "info", None));
    match retry {
        Ok(()) => tracing::warn!(error = %first, "logging as configured failed; logging to stderr"),
        Err(e) => eprintln!("samgate: logging failed: {first}; {e}"),
    }
}

/// Says where the input went; the bytes when only memory holds them.
fn report_capture(
    captured: Captured,
    failures: &[spool::DirFailure],
    read_error: Option<&std::io::Error>,
) -> Option<Vec<u8>> {
    for f in failures {
        tracing::error!(spool = %f.dir.display(), error = %f.error, "a spool directory could not keep the input; moved on to the next");
    }
    if let Some(e) = read_error {
        tracing::error!(error = %e, "reading stdin failed; what was read before is kept");
    }
    match captured {
        Captured::Empty => None,
        Captured::Spooled { dir, bytes } => {
            tracing::debug!(spool = %dir.display(), bytes, "input spooled");
            None
        }
        Captured::InMemory(bytes) => {
            tracing::error!(bytes = bytes.len(), "no spool directory could keep the input: delivering it from memory, and what Kafka does not take now is lost");
            Some(bytes)
        }
    }
}

/// The spool directories, known before the configuration is parsed: flags, then the file and
/// the environment (just these two keys, leniently), then the defaults.
fn early_spool_dirs(args: &ShimArgs) -> Vec<PathBuf> {
    let defaults = crate::config::ShimConfig::default();
    let figment = Config::figment(nonempty_path(&args.config).as_deref()).ok();
    let configured = |key: &str| {
        figment
            .as_ref()
            .and_then(|f| f.extract_inner::<PathBuf>(key).ok())
    };
    let primary = nonempty_path(&args.spool_dir)
        .or_else(|| configured("shim.spool_dir"))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(defaults.spool_dir);
    let fallback = nonempty_path(&args.fallback_spool_dir)
        .or_else(|| configured("shim.fallback_spool_dir"))
        .unwrap_or(defaults.fallback_spool_dir);
    let mut dirs = vec![primary];
    if !fallback.as_os_str().is_empty() && fallback != dirs[0] {
        dirs.push(fallback);
    }
    dirs
}

fn nonempty_path(value: &Option<PathBuf>) -> Option<PathBuf> {
    value.clone().filter(|p| !p.as_os_str().is_empty())
}

/// Merges the shim's configuration (`[kafka]` and `[shim]` only), environment and flags into its
/// options (and its log file).
fn shim_options(
    args: &ShimArgs,
    spool_dirs: Vec<PathBuf>,
    collector: String,
) -> Result<(ShimOptions, Option<PathBuf>), String> {
    let (mut kafka, mut shim) = crate::config::load_shim(nonempty_path(&args.config).as_deref())
        .map_err(|e| e.to_string())?;
    if let Some(brokers) = nonempty(&args.brokers) {
        kafka.brokers = brokers;
    }
    if let Some(site) = nonempty(&args.site) {
        shim.site = Some(site);
    }
    if let Some(topic) = nonempty(&args.topic) {
        kafka.topics.events = topic;
    }
    if let Some(topic) = nonempty(&args.dlq_topic) {
        kafka.topics.dlq = topic;
    }
    if let Some(timeout) = args.delivery_timeout {
        shim.delivery_timeout = timeout;
    }
    if let Some(file) = nonempty_path(&args.log_file) {
        shim.log_file = Some(file);
    }
    crate::config::validate_shim_view(&kafka, &shim).map_err(|e| e.to_string())?;
    let site = shim
        .site
        .clone()
        .ok_or("no site: pass --site NAME (or set shim.site in the config file)")?;
    let options = ShimOptions {
        site,
        collector,
        events_topic: kafka.topics.events.clone(),
        dlq_topic: kafka.topics.dlq.clone(),
        spool_dirs,
        delivery_timeout: shim.delivery_timeout,
        max_line_bytes: shim.max_line_bytes,
        flowmon_api: shim.flowmon_api.clone(),
        kafka,
    };
    Ok((options, shim.log_file))
}

fn nonempty(value: &Option<String>) -> Option<String> {
    value
        .as_ref()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn fail(reason: &str) -> ExitCode {
    eprintln!("samgate: {reason}");
    ExitCode::FAILURE
}

/// Rewrites a `samgate shim …` command line the way Flowmon ADS writes it into one clap accepts:
/// every parameter arrives as `--name 'value'`; an empty value means "not set"; a boolean flag may
/// carry a value (`--flush-spool 'true'`); unknown names are dropped with a warning (returned, to
/// be logged once logging is up). Other subcommands pass through untouched.
pub fn flowmon_args(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let Some(shim_at) = args.iter().position(|a| a == "shim") else {
        return (args, Vec::new());
    };
    let command = Cli::command();
    let shim = command
        .find_subcommand("shim")
        .expect("the shim subcommand exists");
    let known: Vec<(String, bool)> = shim
        .get_arguments()
        .chain(command.get_arguments())
        .filter_map(|a| {
            let takes_value = !matches!(
                a.get_action(),
                ArgAction::SetTrue | ArgAction::Help | ArgAction::Version
            );
            a.get_long().map(|l| (l.to_owned(), takes_value))
        })
        .collect();
    let lookup = |name: &str| known.iter().find(|(n, _)| n == name).map(|(_, v)| *v);

    let mut out: Vec<OsString> = args[..=shim_at].to_vec();
    let mut warnings = Vec::new();
    let rest: Vec<String> = args[shim_at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        i += 1;
        if arg == "-h" || arg == "--help" || arg == "-V" || arg == "--version" {
            out.push(arg.into());
            continue;
        }
        let Some(name) = arg.strip_prefix("--") else {
            warnings.push(format!("ignoring stray argument {arg:?}"));
            continue;
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        // The value is the next argument unless that is itself a parameter name.
        let mut take_value = || match inline.clone() {
            Some(v) => Some(v),
            None if i < rest.len() && !rest[i].starts_with("--") => {
                i += 1;
                Some(rest[i - 1].clone())
            }
            None => None,
        };
        match lookup(name) {
            Some(true) => match take_value() {
                Some(v) if !v.trim().is_empty() => {
                    out.push(format!("--{name}").into());
                    out.push(v.into());
                }
                _ => {} // empty: not set
            },
            Some(false) => {
                let on = take_value()
                    .map(|v| {
                        matches!(
                            v.trim().to_ascii_lowercase().as_str(),
                            "" | "1" | "true" | "yes" | "on"
                        )
                    })
                    .unwrap_or(true);
                // `--flush-spool ''` from ADS reads as "not set"; on the command line it is a flag.
                if on && inline.as_deref() != Some("") {
                    out.push(format!("--{name}").into());
                }
            }
            None => {
                let value = take_value();
                warnings.push(format!(
                    "ignoring unknown parameter --{name}{}",
                    if value.is_some() {
                        " and its value"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> (Vec<String>, Vec<String>) {
        let (out, warnings) = flowmon_args(args.iter().map(OsString::from).collect());
        (
            out.into_iter().map(|a| a.into_string().unwrap()).collect(),
            warnings,
        )
    }

    #[test]
    fn flowmon_parameters_become_clap_flags() {
        let (out, warnings) = rewrite(&[
            "samgate",
            "shim",
            "--site",
            "prague",
            "--brokers",
            "k:9092",
            "--topic",
            "",
            "--fw",
            "192.0.2.1",
            "--spool-dir=/tmp/s",
        ]);
        assert_eq!(
            out,
            [
                "samgate",
                "shim",
                "--site",
                "prague",
                "--brokers",
                "k:9092",
                "--spool-dir",
                "/tmp/s"
            ]
        );
        assert_eq!(warnings, ["ignoring unknown parameter --fw and its value"]);
        Cli::try_parse_from(out).expect("clap accepts the rewrite");
    }

    #[test]
    fn boolean_flags_accept_an_ads_value() {
        let (out, _) = rewrite(&["samgate", "shim", "--flush-spool", "true", "--site", "a"]);
        assert_eq!(out, ["samgate", "shim", "--flush-spool", "--site", "a"]);
        let (out, _) = rewrite(&["samgate", "shim", "--flush-spool", "false"]);
        assert_eq!(out, ["samgate", "shim"]);
        let (out, _) = rewrite(&["samgate", "shim", "--flush-spool"]);
        assert_eq!(out, ["samgate", "shim", "--flush-spool"]);
    }

    #[test]
    fn values_that_look_odd_are_kept_verbatim() {
        let (out, _) = rewrite(&["samgate", "shim", "--site", "a b;$(x)"]);
        assert_eq!(
            out[3], "a b;$(x)",
            "validation, not rewriting, rejects it later"
        );
    }

    #[test]
    fn other_subcommands_pass_through() {
        let args = ["samgate", "check-config", "--config", "x", "--bogus"];
        let (out, warnings) = rewrite(&args);
        assert_eq!(out, args);
        assert!(warnings.is_empty());
    }

    #[test]
    fn redacted_config_hides_property_values() {
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        let json = redacted_json(&config);
        assert!(!json.contains("hunter2"));
        assert!(json.contains("sasl.password"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
