//! The `opspawn` command: `serve` runs the host; the other commands are
//! clients of a running server's REST API.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use figment::providers::Serialized;
use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::config::Config;
use crate::sse::SseStream;

#[derive(Debug, Parser)]
#[command(
    name = "opspawn",
    version,
    about = "An agent runtime with sandboxed WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Whether this command runs the server, the only one that exports traces.
    pub fn serves(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: scheduler, store, REST API and plugin folder.
    Serve(ServeArgs),
    /// Submit a task and follow its steps live until it ends.
    Run(RunArgs),
    /// List, show, follow or cancel tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Create, list, show, pause, resume or delete schedules (recurring tasks).
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// List a task's tool calls that need approval; approve or reject one.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Show or delete a conversation thread (the tasks run with --thread).
    #[command(subcommand)]
    Threads(ThreadsCommand),
    /// List loaded plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Write, build, check and install a plugin of your own.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the effective server configuration.
    Config(ServeArgs),
    /// Make API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve MCP over stdio for a running server (for MCP desktop clients):
    /// its tools, run_task, get_task and cancel_task. Sends OPSPAWN_TOKEN.
    Mcp(ClientArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new random token and the configuration line that admits it.
    New {
        /// The tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// A label for logs.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "OPSPAWN_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address [env: OPSPAWN_ADDR]
    #[arg(long)]
    addr: Option<String>,
    /// Data directory [env: OPSPAWN_DATA_DIR]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Plugin folder [env: OPSPAWN_PLUGIN_DIR]
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Database URL, such as sqlite://opspawn.db [env: OPSPAWN_DATABASE_URL]
    #[arg(long)]
    database_url: Option<String>,
    /// How many tasks run at once on this host [env: OPSPAWN_MAX_RUNNING_TASKS]
    #[arg(long, alias = "workers")]
    max_running_tasks: Option<usize>,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut flags = Map::new();
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                flags.insert(key.to_owned(), value);
            }
        };
        set("addr", self.addr.as_ref().map(|v| json!(v)));
        set("data_dir", self.data_dir.as_ref().map(|v| json!(v)));
        set("plugin_dir", self.plugin_dir.as_ref().map(|v| json!(v)));
        set("database_url", self.database_url.as_ref().map(|v| json!(v)));
        set(
            "max_running_tasks",
            self.max_running_tasks.map(|v| json!(v)),
        );
        Config::load(
            self.config.as_deref(),
            figment::Figment::from(Serialized::globals(Value::Object(flags))),
        )
        .context("invalid configuration")
    }
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The server's base URL; defaults to http://<OPSPAWN_ADDR or 127.0.0.1:8080>.
    #[arg(long, env = "OPSPAWN_SERVER", global = true)]
    server: Option<String>,
}

impl ClientArgs {
    fn base_url(&self) -> String {
        match &self.server {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let addr =
                    std::env::var("OPSPAWN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
                format!("http://{addr}")
            }
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    task: TaskFields,
    /// Continue this conversation thread: the agent sees the thread's
    /// earlier tasks, and the thread's tasks run one at a time.
    #[arg(long)]
    thread: Option<String>,
    /// The long-term memory namespace the task's plugins remember in
    /// (`default` when not given).
    #[arg(long)]
    memory_namespace: Option<String>,
    /// Print the task id and return without following it.
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// A task as the command line describes it: `opspawn run`'s, and each run
/// of `opspawn schedules create`'s.
#[derive(Debug, Args)]
struct TaskFields {
    /// What the agent should do.
    goal: String,
    #[arg(long)]
    planner: Option<String>,
    /// The LLM adapter plugin, such as scripted.
    #[arg(long)]
    llm: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// A tool the agent may use (repeat for several); all loaded tools if none.
    #[arg(long = "tool")]
    tools: Vec<String>,
    /// Plugin options as JSON: {"planner": {...}, "llm": {...}}.
    #[arg(long)]
    options: Option<String>,
    #[arg(long)]
    max_steps: Option<u32>,
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Ask for structured output: a JSON file holding {"name": ..., "schema":
    /// {JSON Schema}, "strict": false}; the answer must match the schema.
    #[arg(long, value_name = "FILE")]
    response_format: Option<std::path::PathBuf>,
    /// An image for the model to see with the goal: an http(s) address,
    /// or a PNG, JPEG, WebP or GIF file sent inline (repeat for several).
    #[arg(long = "image", value_name = "URL_OR_FILE")]
    images: Vec<String>,
    /// Make it a call task: one call of this tool, with no planner or LLM;
    /// its result is the tool's output.
    #[arg(long, value_name = "TOOL")]
    call: Option<String>,
    /// The call's arguments, as a JSON object (default {}).
    #[arg(long, value_name = "JSON", requires = "call")]
    arguments: Option<String>,
}

impl TaskFields {
    /// The body `POST /v1/tasks` takes.
    fn body(self) -> anyhow::Result<Value> {
        let mut body = json!({"goal": self.goal});
        let fields = [
            ("planner", self.planner.map(Value::from)),
            ("llm", self.llm.map(Value::from)),
            ("model", self.model.map(Value::from)),
            ("max_steps", self.max_steps.map(Value::from)),
            ("timeout_secs", self.timeout_secs.map(Value::from)),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                body[key] = value;
            }
        }
        if !self.tools.is_empty() {
            body["tools"] = json!(self.tools);
        }
        if let Some(options) = self.options {
            body["options"] =
                serde_json::from_str(&options).context("--options is not valid JSON")?;
        }
        if let Some(path) = self.response_format {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading --response-format {}", path.display()))?;
            body["response_format"] = serde_json::from_str(&text).with_context(|| {
                format!("--response-format {} is not valid JSON", path.display())
            })?;
        }
        if !self.images.is_empty() {
            let images: anyhow::Result<Vec<Value>> =
                self.images.iter().map(|image| image_field(image)).collect();
            body["images"] = Value::Array(images?);
        }
        if let Some(tool) = self.call {
            let arguments = match self.arguments {
                Some(text) => {
                    serde_json::from_str(&text).context("--arguments is not valid JSON")?
                }
                None => json!({}),
            };
            body["call"] = json!({"tool": tool, "arguments": arguments});
        }
        Ok(body)
    }
}

/// One of `--image`: an address as `{url}`, a file as `{media_type, data}`,
/// its type told by its first bytes (the server checks the rest).
fn image_field(image: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    if image.starts_with("https://") || image.starts_with("http://") {
        return Ok(json!({"url": image}));
    }
    let bytes = std::fs::read(image).with_context(|| format!("reading --image {image}"))?;
    let media_type = crate::images::media_type_of(&bytes).with_context(|| {
        format!("--image {image} is not a PNG, JPEG, WebP or GIF file (or an http(s) address)")
    })?;
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(json!({"media_type": media_type, "data": data}))
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum SchedulesCommand {
    /// Create a schedule: the task runs at every tick of the cron
    /// expression, read in the time zone.
    Create {
        /// 5 fields (minute hour day-of-month month day-of-week), or 6 with
        /// seconds first, such as "0 9 * * MON-FRI".
        #[arg(long)]
        cron: String,
        /// An IANA time zone, such as Europe/Berlin [default: UTC].
        #[arg(long)]
        timezone: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Ticks missed while no server ran: skip them, or run once for all.
        #[arg(long, value_parser = ["skip", "run_once"])]
        missed_ticks: Option<String>,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
        #[command(flatten)]
        task: TaskFields,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List schedules, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a schedule and its next runs as JSON.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pause a schedule: no runs until it is resumed.
    Pause {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a schedule at its next tick.
    Resume {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a schedule; the tasks it created stay.
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs `opspawn schedules ...`.
async fn schedules_command(command: SchedulesCommand) -> anyhow::Result<i32> {
    let summary = |schedule: &Value| {
        let next = match schedule["next_run_at"].as_str() {
            Some(next) => format!("next {next}"),
            None if schedule["paused"] == true => "paused".to_owned(),
            None => "no next run".to_owned(),
        };
        println!(
            "{}  {:<20}  {} ({})  {}  {}",
            schedule["id"].as_str().unwrap_or_default(),
            schedule["cron"].as_str().unwrap_or_default(),
            schedule["timezone"].as_str().unwrap_or_default(),
            schedule["missed_ticks"].as_str().unwrap_or_default(),
            next,
            one_line(
                schedule["name"]
                    .as_str()
                    .or(schedule["task"]["goal"].as_str())
                    .unwrap_or_default(),
                50
            ),
        );
    };
    match command {
        SchedulesCommand::Create {
            cron,
            timezone,
            name,
            missed_ticks,
            paused,
            task,
            client,
        } => {
            let mut body = json!({"cron": cron, "task": task.body()?, "paused": paused});
            if let Some(timezone) = timezone {
                body["timezone"] = json!(timezone);
            }
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            if let Some(missed_ticks) = missed_ticks {
                body["missed_ticks"] = json!(missed_ticks);
            }
            let url = format!("{}/v1/schedules", client.base_url());
            let schedule = send(http().post(url).json(&body)).await?;
            summary(&schedule);
        }
        SchedulesCommand::List {
            limit,
            cursor,
            client,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(cursor.map(|c| ("cursor", c)));
            let url = format!("{}/v1/schedules", client.base_url());
            let page = send(http().get(url).query(&query)).await?;
            for schedule in page["schedules"].as_array().into_iter().flatten() {
                summary(schedule);
            }
            if let Some(cursor) = page["next_cursor"].as_str() {
                println!("more: opspawn schedules list --cursor {cursor}");
            }
        }
        SchedulesCommand::Show { id, client } => {
            let url = format!("{}/v1/schedules/{id}", client.base_url());
            let schedule = send(http().get(url)).await?;
            println!("{}", serde_json::to_string_pretty(&schedule)?);
        }
        SchedulesCommand::Pause { id, client } => {
            let url = format!("{}/v1/schedules/{id}/pause", client.base_url());
            summary(&send(http().post(url)).await?);
        }
        SchedulesCommand::Resume { id, client } => {
            let url = format!("{}/v1/schedules/{id}/resume", client.base_url());
            summary(&send(http().post(url)).await?);
        }
        SchedulesCommand::Delete { id, client } => {
            let url = format!("{}/v1/schedules/{id}", client.base_url());
            send(http().delete(url)).await?;
            println!("{id}: deleted (the tasks it created stay)");
        }
    }
    Ok(0)
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// A task's calls that need approval: pending ones, and how earlier
    /// ones were answered.
    List {
        task: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a pending call; it runs once every pending call of the task
    /// is answered.
    Approve {
        task: String,
        call: String,
        /// The arguments to run the tool with instead (a JSON object).
        #[arg(long)]
        input: Option<String>,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Reject a pending call; the planner sees the rejection (and the
    /// comment) as the call's error.
    Reject {
        task: String,
        call: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs `opspawn approvals ...`.
async fn approvals_command(command: ApprovalsCommand) -> anyhow::Result<i32> {
    let summary = |approval: &Value| {
        let decided = match approval["decided_by"].as_str() {
            Some(by) => format!(
                " by {by} at {}",
                approval["decided_at"].as_str().unwrap_or_default()
            ),
            None => format!(
                " until {}",
                approval["expires_at"].as_str().unwrap_or_default()
            ),
        };
        println!(
            "{}  {:<8}  step {}  {} {}{decided}",
            approval["call_id"].as_str().unwrap_or_default(),
            approval["status"].as_str().unwrap_or_default(),
            approval["step"],
            approval["tool"].as_str().unwrap_or_default(),
            one_line(
                &approval
                    .get("edited_input")
                    .filter(|v| !v.is_null())
                    .unwrap_or(&approval["input"])
                    .to_string(),
                80
            ),
        );
    };
    let (task, call, body, client) = match command {
        ApprovalsCommand::List { task, client } => {
            let url = format!("{}/v1/tasks/{task}/approvals", client.base_url());
            let list = send(http().get(url)).await?;
            for approval in list["approvals"].as_array().into_iter().flatten() {
                summary(approval);
            }
            return Ok(0);
        }
        ApprovalsCommand::Approve {
            task,
            call,
            input,
            comment,
            client,
        } => {
            let mut body = json!({"decision": "approve", "comment": comment});
            if let Some(input) = input {
                body["input"] = serde_json::from_str(&input)
                    .context("--input must be JSON: the tool's arguments as an object")?;
            }
            (task, call, body, client)
        }
        ApprovalsCommand::Reject {
            task,
            call,
            comment,
            client,
        } => (
            task,
            call,
            json!({"decision": "reject", "comment": comment}),
            client,
        ),
    };
    let url = format!("{}/v1/tasks/{task}/approvals/{call}", client.base_url());
    summary(&send(http().post(url).json(&body)).await?);
    Ok(0)
}

#[derive(Debug, Subcommand)]
enum TasksCommand {
    /// List tasks, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a task and its steps as JSON.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a task's steps live until it ends.
    Watch {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a queued or running task.
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ThreadsCommand {
    /// List a thread's tasks, newest first, with their answers.
    Show {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a thread's tasks with their steps and events (refused while
    /// one of them is queued or running).
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs `opspawn threads ...`.
async fn threads_command(command: ThreadsCommand) -> anyhow::Result<i32> {
    match command {
        ThreadsCommand::Show {
            id,
            limit,
            cursor,
            client,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(cursor.map(|c| ("cursor", c)));
            let url = format!("{}/v1/threads/{id}", client.base_url());
            let page = send(http().get(url).query(&query)).await?;
            for task in page["tasks"].as_array().into_iter().flatten() {
                print_task_line(task);
                if let Some(answer) = task["result"].as_str() {
                    println!("  -> {}", one_line(answer, 76));
                }
            }
            if let Some(cursor) = page["next_cursor"].as_str() {
                println!("more: opspawn threads show {id} --cursor {cursor}");
            }
        }
        ThreadsCommand::Delete { id, client } => {
            let url = format!("{}/v1/threads/{id}", client.base_url());
            send(http().delete(url)).await?;
            println!("{id}: deleted, with its tasks");
        }
    }
    Ok(0)
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// List loaded plugins and files that failed to load.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Write a tool project that builds as it is, into ./NAME (or --dir).
    New {
        /// The plugin's name: lower-case letters, digits and '-'; the tool
        /// is named after it with '_' for '-'.
        name: String,
        #[arg(long, value_enum)]
        lang: crate::authoring::Lang,
        /// Where to write the project [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rust: the plugins/sdk folder of an Opspawn checkout, which the
        /// project depends on [default: the checkout this binary was built from].
        #[arg(long, env = "OPSPAWN_SDK_PATH")]
        sdk: Option<PathBuf>,
    },
    /// Build the project in DIR into DIR/NAME.wasm with its language's
    /// toolchain (cargo, componentize-py or componentize-js).
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Load a component as the server would (same loader, limits and
    /// policy) and say what it is and whether it is ready; exits 1 if not.
    Check {
        file: PathBuf,
        /// Its manifest [default: FILE's .toml beside it, if any].
        manifest: Option<PathBuf>,
        #[command(flatten)]
        server: ServeArgs,
    },
    /// Copy a component, and its manifest, into the server's plugin folder
    /// atomically; a running server loads it within a second.
    Install {
        file: PathBuf,
        /// Its manifest [default: FILE's .toml beside it, if any].
        manifest: Option<PathBuf>,
        #[command(flatten)]
        server: ServeArgs,
    },
}

/// Runs `opspawn plugin ...`; returns the process exit code.
async fn plugin_command(command: PluginCommand) -> anyhow::Result<i32> {
    use crate::authoring;
    match command {
        PluginCommand::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let dir = authoring::new_project(lang, &name, dir, sdk)?;
            println!("wrote {}", dir.display());
            println!(
                "next: opspawn plugin build {0} && opspawn plugin install {0}/{name}.wasm",
                dir.display()
            );
            Ok(0)
        }
        PluginCommand::Build { dir } => {
            let built = authoring::build(&dir)?;
            let size = std::fs::metadata(&built)?.len();
            println!("built {} ({} KiB)", built.display(), size.div_ceil(1024));
            println!("next: opspawn plugin install {}", built.display());
            Ok(0)
        }
        PluginCommand::Check {
            file,
            manifest,
            server,
        } => authoring::check(&server.load()?, &file, manifest.as_deref()).await,
        PluginCommand::Install {
            file,
            manifest,
            server,
        } => {
            let folder = server.load()?.plugin_dir();
            let installed = authoring::install(&folder, &file, manifest.as_deref())?;
            println!("installed {}", installed.display());
            println!(
                "a server watching {} loads it within a second: opspawn plugins list",
                folder.display()
            );
            Ok(0)
        }
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for
/// them on the regions it allocates from (`madvise(MADV_HUGEPAGE)`), so
/// the first touch of each 2 MiB of a growing heap zeroed a whole huge page,
/// and a region only partly used counted 2 MiB resident. With 10,000 tasks
/// submitted at once against a slow LLM, zeroing huge pages took 6.7 % of
/// the server's CPU, the batch was submitted in 2 to 5.5 s instead of about
/// 9, and the same peak RSS held about 9,000 waiting tasks instead of 6,600
/// (docs/architecture.md, "Running tasks"). Small pages are zeroed as they are
/// touched. Harmless where the kernel has no huge pages.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of ours; it only sets a flag on this process's address space.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The `opspawn` process from start to end: reads the command line, runs
/// it on a multi-threaded runtime and returns the exit code. It lives here
/// rather than in `main.rs` so that the whole async call tree below it is
/// compiled once, in this library: release builds share no generic code
/// between crates, and the binary's `block_on` of it compiled it all a
/// second time (about 90 s of every build on 2 cores).
pub fn run_process() -> i32 {
    crate::install_tls_provider();
    // wasmtime builds an error value every time a plugin's store is dropped,
    // which is once per plugin call. With RUST_BACKTRACE=1 in the
    // environment, each of those captured a backtrace, costing more than the
    // call itself. Error values here are never printed with backtraces, so
    // they capture one only when RUST_LIB_BACKTRACE asks; panics still
    // follow RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    // Before the runtime starts: the trace exporter's client blocks, and
    // must be built and shut down outside it.
    let telemetry = crate::telemetry::Telemetry::init(cli.serves());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let code = runtime.block_on(async {
        match main(cli).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                2
            }
        }
    });
    drop(runtime);
    telemetry.shutdown();
    code
}

/// Runs the command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            crate::server::serve(args.load()?).await?;
            Ok(0)
        }
        Command::Config(args) => {
            let config = args.load()?;
            for warning in config.deprecations() {
                eprintln!("warning: {warning}");
            }
            println!("{}", toml::to_string_pretty(&config)?);
            Ok(0)
        }
        Command::Run(args) => run(args).await,
        Command::Plugin(command) => plugin_command(command).await,
        Command::Schedules(command) => schedules_command(command).await,
        Command::Approvals(command) => approvals_command(command).await,
        Command::Threads(command) => threads_command(command).await,
        Command::Mcp(client) => {
            let token = std::env::var("OPSPAWN_TOKEN").ok();
            crate::mcp::server::serve_stdio(client.base_url(), token).await?;
            Ok(0)
        }
        Command::Token(TokenCommand::New { tenant, name }) => {
            let token = crate::api::auth::new_token();
            let hash = crate::api::auth::token_hash(&token);
            let name = name.map(|n| format!(", name = {n:?}")).unwrap_or_default();
            println!("token (give it to the client as OPSPAWN_TOKEN; it is not stored anywhere):");
            println!("  {token}");
            println!("add to the server's configuration file:");
            println!("  [[auth.tokens]]");
            println!("  tenant = {tenant:?}");
            println!(
                "  sha256 = {hash:?}{}",
                if name.is_empty() {
                    String::new()
                } else {
                    format!("\n  {}", name.trim_start_matches(", "))
                }
            );
            Ok(0)
        }
        Command::Tasks(TasksCommand::List {
            status,
            limit,
            cursor,
            client,
        }) => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(status.map(|s| ("status", s)));
            query.extend(cursor.map(|c| ("cursor", c)));
            let url = format!("{}/v1/tasks", client.base_url());
            let page = send(http().get(url).query(&query)).await?;
            for task in page["tasks"].as_array().into_iter().flatten() {
                print_task_line(task);
            }
            if let Some(cursor) = page["next_cursor"].as_str() {
                println!("more: opspawn tasks list --cursor {cursor}");
            }
            Ok(0)
        }
        Command::Tasks(TasksCommand::Show { id, client }) => {
            let task = send(http().get(format!("{}/v1/tasks/{id}", client.base_url()))).await?;
            println!("{}", serde_json::to_string_pretty(&task)?);
            Ok(0)
        }
        Command::Tasks(TasksCommand::Watch { id, client }) => follow(&client.base_url(), &id).await,
        Command::Tasks(TasksCommand::Cancel { id, client }) => {
            let url = format!("{}/v1/tasks/{id}/cancel", client.base_url());
            let task = send(http().post(url)).await?;
            println!(
                "{id}: {}",
                if task["status"] == "cancelled" {
                    "cancelled"
                } else {
                    "cancel requested; it stops at the next step boundary"
                }
            );
            Ok(0)
        }
        Command::Plugins(PluginsCommand::List { client }) => {
            let list = send(http().get(format!("{}/v1/plugins", client.base_url()))).await?;
            for plugin in list["plugins"].as_array().into_iter().flatten() {
                print_plugin(plugin);
            }
            for server in list["mcp_servers"].as_array().into_iter().flatten() {
                print_mcp_server(server);
            }
            for failure in list["failures"].as_array().into_iter().flatten() {
                println!(
                    "failed to load {}: {}",
                    failure["file"].as_str().unwrap_or_default(),
                    failure["error"].as_str().unwrap_or_default()
                );
            }
            for old in list["old_versions_in_use"].as_array().into_iter().flatten() {
                println!(
                    "old version of {} still in use by {} task(s): sha256 {}",
                    old["name"].as_str().unwrap_or_default(),
                    old["tasks"],
                    old["sha256"].as_str().unwrap_or_default(),
                );
            }
            let cache = &list["compile_cache"];
            println!(
                "compile cache: {} compiled component(s), {:.1} MiB",
                cache["artifacts"],
                cache["bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
            );
            Ok(0)
        }
    }
}

/// The API client; sends `OPSPAWN_TOKEN` as a bearer token when set.
/// One plugin: what it is, and what it was granted.
fn print_plugin(plugin: &Value) {
    let names = |list: &Value, key: &str| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| match key {
                "" => item.as_str().map(str::to_owned),
                key => item[key].as_str().map(str::to_owned),
            })
            .collect()
    };
    println!(
        "{:<18} {:<11} wit {}  sha256 {}",
        plugin["name"].as_str().unwrap_or_default(),
        plugin["kind"].as_str().unwrap_or_default(),
        plugin["wit_version"].as_str().unwrap_or_default(),
        &plugin["sha256"].as_str().unwrap_or_default()[..12],
    );
    let tools = names(&plugin["tools"], "name");
    if !tools.is_empty() {
        println!("    tools:    {}", tools.join(", "));
    }
    let limits = &plugin["limits"];
    println!(
        "    limits:   {} MiB, {} per call, {} bytes of output",
        limits["memory_bytes"].as_u64().unwrap_or_default() >> 20,
        limits["call_timeout"].as_str().unwrap_or_default(),
        limits["max_output_bytes"]
    );
    let grants = &plugin["grants"];
    let mut granted = Vec::new();
    let hosts = names(&grants["outbound_hosts"], "");
    if !hosts.is_empty() {
        granted.push(format!("network {}", hosts.join(" ")));
    }
    let env = names(&grants["env"], "");
    if !env.is_empty() {
        granted.push(format!("env {}", env.join(" ")));
    }
    for dir in grants["dirs"].as_array().into_iter().flatten() {
        granted.push(format!(
            "folder {} as {} ({})",
            dir["host_path"].as_str().unwrap_or_default(),
            dir["guest_path"].as_str().unwrap_or_default(),
            if dir["writable"] == true {
                "read-write"
            } else {
                "read-only"
            }
        ));
    }
    for credential in grants["credentials"].as_array().into_iter().flatten() {
        granted.push(format!(
            "credential {} for {} from {}",
            credential["header"].as_str().unwrap_or_default(),
            credential["host"].as_str().unwrap_or_default(),
            names(&credential["variables"], "").join(" ")
        ));
    }
    if granted.is_empty() {
        granted.push("nothing".into());
    }
    println!("    granted:  {}", granted.join("; "));
    let refused = names(&plugin["refused"], "");
    if !refused.is_empty() {
        println!("    refused:  {}", refused.join("; "));
    }
}

/// One MCP server: how it is doing and the tools it offers.
fn print_mcp_server(server: &Value) {
    let transport = &server["transport"];
    let reached = match transport["type"].as_str() {
        Some("stdio") => format!(
            "stdio {}",
            transport["command"].as_str().unwrap_or_default()
        ),
        _ => transport["url"].as_str().unwrap_or_default().to_owned(),
    };
    println!(
        "{:<18} {:<11} {}  {reached}",
        server["name"].as_str().unwrap_or_default(),
        "mcp-server",
        server["status"].as_str().unwrap_or_default(),
    );
    if let Some(error) = server["error"].as_str() {
        println!("    error:    {error}");
    }
    let tools: Vec<&str> = server["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tool| tool["name"].as_str())
        .collect();
    if !tools.is_empty() {
        println!("    tools:    {}", tools.join(", "));
    }
}

fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("OPSPAWN_TOKEN")
        && let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .expect("building an HTTP client")
}

/// Sends a request and returns its JSON body, or the API's error as an error.
async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request
        .send()
        .await
        .context("cannot reach the opspawn server; is `opspawn serve` running (see --server)?")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let code = body["error"]["code"].as_str().unwrap_or("unknown");
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        bail!("the server answered {status} ({code}): {message}");
    }
    Ok(body)
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let base = args.client.base_url();
    let mut body = args.task.body()?;
    if let Some(thread) = args.thread {
        body["thread"] = json!(thread);
    }
    if let Some(namespace) = args.memory_namespace {
        body["memory_namespace"] = json!(namespace);
    }
    let task = send(http().post(format!("{base}/v1/tasks")).json(&body)).await?;
    let id = task["id"]
        .as_str()
        .context("the server returned no task id")?
        .to_owned();
    if args.detach {
        println!("{id}");
        return Ok(0);
    }
    eprintln!("task {id} submitted; following its steps (Ctrl-C stops following, not the task)");
    follow(&base, &id).await
}

/// Prints a task's events as they happen; the exit code says how it ended.
async fn follow(base: &str, id: &str) -> anyhow::Result<i32> {
    let response = http()
        .get(format!("{base}/v1/tasks/{id}/events"))
        .send()
        .await
        .context("cannot reach the opspawn server")?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        bail!(
            "the server answered {status}: {}",
            body["error"]["message"].as_str().unwrap_or("no details")
        );
    }
    let mut events = SseStream::new(Box::pin(response.bytes_stream()));
    let mut streaming = false;
    let stdout = std::io::stdout();
    while let Some(event) = events.next().await {
        let event = event.context("the event stream broke")?;
        let body: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let data = &body["data"];
        let mut out = stdout.lock();
        let kind = event.event.as_deref().unwrap_or("message");
        if kind == "llm.delta" {
            write!(out, "{}", data["text"].as_str().unwrap_or_default())?;
            out.flush()?;
            streaming = true;
            continue;
        }
        if streaming {
            writeln!(out)?;
            streaming = false;
        }
        match kind {
            "task.started" => writeln!(out, "· started (attempt {})", data["attempt"])?,
            "step.started" => {
                let what = match data["kind"].as_str() {
                    Some("tool") => format!(
                        "tool {} {}",
                        data["input"]["name"].as_str().unwrap_or("?"),
                        one_line(&data["input"]["arguments"].to_string(), 80)
                    ),
                    _ => format!("llm {}", data["plugin"].as_str().unwrap_or("?")),
                };
                writeln!(out, "→ step {}: {what}", data["seq"])?;
            }
            "step.finished" => {
                if let Some(error) = data["error"].as_object() {
                    writeln!(
                        out,
                        "✗ step {} failed ({}): {}",
                        data["seq"],
                        error["code"].as_str().unwrap_or("?"),
                        error["message"].as_str().unwrap_or("")
                    )?;
                } else if data["kind"] == "tool" {
                    writeln!(
                        out,
                        "← step {}: {}",
                        data["seq"],
                        one_line(&data["output"].to_string(), 100)
                    )?;
                } else {
                    let message = &data["output"]["message"];
                    let text = message["content"].as_str().unwrap_or_default();
                    let calls = message["tool_calls"].as_array().map_or(0, Vec::len);
                    let summary = if calls > 0 {
                        format!("asks for {calls} tool call(s)")
                    } else {
                        one_line(text, 100)
                    };
                    writeln!(out, "← step {}: {summary}", data["seq"])?;
                }
            }
            "task.cancel_requested" => writeln!(out, "· cancel requested")?,
            "task.waiting_approval" => {
                for call in data["pending"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "? waiting for approval of call {} (step {}): {} {} (opspawn approvals approve|reject {id} {})",
                        call["call_id"].as_str().unwrap_or("?"),
                        call["step"],
                        call["tool"].as_str().unwrap_or("?"),
                        one_line(&call["input"].to_string(), 80),
                        call["call_id"].as_str().unwrap_or("?"),
                    )?;
                }
            }
            "approval.decided" => writeln!(
                out,
                "· call {} {} by {}",
                data["call_id"].as_str().unwrap_or("?"),
                data["decision"].as_str().unwrap_or("?"),
                data["decided_by"].as_str().unwrap_or("?"),
            )?,
            "task.finished" => {
                let status = data["status"].as_str().unwrap_or("?");
                match status {
                    "succeeded" => writeln!(
                        out,
                        "✓ succeeded: {}",
                        data["result"].as_str().unwrap_or_default()
                    )?,
                    "cancelled" => writeln!(out, "· cancelled")?,
                    _ => writeln!(
                        out,
                        "✗ {status} ({}): {}",
                        data["error"]["code"].as_str().unwrap_or("?"),
                        data["error"]["message"].as_str().unwrap_or("")
                    )?,
                }
                return Ok(if status == "succeeded" { 0 } else { 1 });
            }
            _ => {}
        }
    }
    bail!("the event stream ended before the task did; `opspawn tasks show {id}` shows where it is")
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// One task of a list, on one line: id, status, when it was created, goal.
fn print_task_line(task: &Value) {
    println!(
        "{}  {:<9}  {}  {}",
        task["id"].as_str().unwrap_or_default(),
        task["status"].as_str().unwrap_or_default(),
        task["created_at"].as_str().unwrap_or_default(),
        one_line(task["goal"].as_str().unwrap_or_default(), 60),
    );
}
