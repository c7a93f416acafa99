//! `ferrum`: the command line. Lab lifecycle (`lab_cmd`), Kubernetes objects (`objects_cmd`).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

mod lab_cmd;
mod objects_cmd;
mod observe_cmd;
mod policy_cmd;
mod service_cmd;

#[derive(Parser)]
#[command(
    name = "ferrum",
    version,
    about = "Ferrum: eBPF pod networking, and a lab cluster to run it in"
)]
struct Cli {
    /// Which lab to talk to when several exist.
    #[arg(long, global = true, env = "FERRUM_LAB", default_value = "ferrum")]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect and remove lab clusters.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Create or replace objects from multi-document YAML (`-f FILE` or `-f -`).
    Apply(objects_cmd::ApplyArgs),
    /// Delete the objects named in multi-document YAML.
    Delete(objects_cmd::ApplyArgs),
    /// List objects: pods, services, networkpolicies, namespaces, nodes.
    Get(objects_cmd::GetArgs),
    /// Run a command inside a pod's network namespace; its exit code is passed through.
    Exec(lab_cmd::ExecArgs),
    /// Show flows from every node, merged by time (filters, --follow, -o compact|json|table).
    Observe(observe_cmd::ObserveArgs),
    /// Explain Service load balancing (`service trace`).
    Service {
        #[command(subcommand)]
        command: service_cmd::ServiceCommand,
    },
    /// NetworkPolicy tools: `policy trace --from NS/POD --to NS/POD|IP --port P`.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
}

// Parsed once per process: the size of the largest variant (lab up's options) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum LabCommand {
    /// Build a lab cluster; returns when every node is Ready.
    Up(lab_cmd::UpArgs),
    /// Remove a lab: namespaces, links, bpffs pins, processes, state.
    Down,
    /// Show the lab's profile, nodes and external host.
    Status(lab_cmd::StatusArgs),
    /// Change a running lab's profile: `--pod-cidr SUPERSET` expands the overlay pod CIDR
    /// without disturbing running pods (shrinking is refused).
    Update(lab_cmd::UpdateArgs),
    /// (internal) The lab's control-plane daemon; started by `lab up`.
    #[command(hide = true)]
    Daemon,
}

#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output")]
    pub output: Option<String>,
}

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`ferrum get pods | head`) instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result: Result<i32> = match cli.command {
        Command::Lab { command } => match command {
            LabCommand::Up(a) => lab_cmd::up(&cli.name, a).map(|_| 0),
            LabCommand::Down => lab_cmd::down(&cli.name).map(|_| 0),
            LabCommand::Status(a) => lab_cmd::status(&cli.name, a).map(|_| 0),
            LabCommand::Update(a) => lab_cmd::update(&cli.name, a).map(|_| 0),
            LabCommand::Daemon => lab_cmd::daemon(&cli.name).map(|_| 0),
        },
        Command::Apply(a) => objects_cmd::apply(&cli.name, a).map(|_| 0),
        Command::Delete(a) => objects_cmd::delete(&cli.name, a).map(|_| 0),
        Command::Get(a) => objects_cmd::get(&cli.name, a).map(|_| 0),
        Command::Exec(a) => lab_cmd::exec(&cli.name, a),
        Command::Observe(a) => observe_cmd::observe(&cli.name, a).map(|_| 0),
        Command::Service { command } => service_cmd::run(&cli.name, command).map(|_| 0),
        Command::Policy { command } => policy_cmd::run(&cli.name, command),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
