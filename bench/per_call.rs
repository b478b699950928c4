//! Section 2: The cost of one tool call: through the host's plugin runtime and
//! through bare wasmtime, with and without the pooling allocator.

use anyhow::{anyhow, bail};
use opspawn::plugins::bindings::v0_2::tool::ToolPre;
use opspawn::plugins::bindings::v0_2::types;
use opspawn::plugins::policy::OperatorPolicy;
use opspawn::plugins::{
    EngineOptions, Limits, PluginRuntime, RecordedVersions, RuntimeOptions, TaskPluginNames,
    build_engine,
};
use opspawn::protocol::CallContext;
use opspawn::telemetry::TraceSpan;
use opspawn_testkit::PluginFolder;
use serde_json::{Value, json};
use std::time::Instant;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::stats::{Samples, micros, row};
use crate::{ANSWER, Args, EXPRESSION, WARM_UP_CALLS};

pub(crate) async fn per_call(args: &Args) -> anyhow::Result<()> {
    let host = time_host(args.calls).await?;
    let pooled = time_bare(true, args.calls).await?;
    let on_demand = time_bare(false, args.calls).await?;

    println!(
        "Per tool call: calculator.wasm, {EXPRESSION:?}, {} calls after {WARM_UP_CALLS} warm-up, one at a time",
        args.calls
    );
    println!("  {:<36}{:>12}{:>12}", "", "median", "p90");
    for (name, samples) in [
        ("host invoke_tool", &host),
        ("bare wasmtime, pooling allocator", &pooled),
        ("bare wasmtime, on-demand allocator", &on_demand),
    ] {
        println!(
            "  {name:<36}{:>12}{:>12}",
            micros(samples.percentile(0.5)),
            micros(samples.percentile(0.9))
        );
    }
    let ratio = |a: &Samples, b: &Samples| {
        a.percentile(0.5).as_secs_f64() / b.percentile(0.5).as_secs_f64()
    };
    row(
        "host / bare (pooling)",
        format!("{:.2}x", ratio(&host, &pooled)),
    );
    row(
        "on-demand / pooling (bare)",
        format!("{:.2}x", ratio(&on_demand, &pooled)),
    );
    println!();
    script_tools(args).await
}

/// Calls the calculator through the host's plugin runtime, loaded from a
/// folder holding only `calculator.wasm` (no manifest: default limits).
pub(crate) async fn time_host(calls: usize) -> anyhow::Result<Samples> {
    let input = json!({ "expression": EXPRESSION });
    let check = |output: &Value| check_answer(&output["result"]);
    time_tool(
        calls,
        &opspawn_testkit::wasm("calculator"),
        None,
        "calculator",
        &input,
        check,
    )
    .await
}

/// The Python and JavaScript examples, each with a fresh instance per call
/// and with warm instances (`[instances] reuse`), when they are built.
pub(crate) async fn script_tools(args: &Args) -> anyhow::Result<()> {
    println!(
        "Per tool call, script examples: {} calls after {WARM_UP_CALLS} warm-up, one at a time",
        args.calls
    );
    println!("  {:<36}{:>12}{:>12}", "", "median", "p90");
    let text = "the quick brown fox jumps over the lazy dog";
    let input = json!({ "text": text });
    for (example, tool) in [
        ("word-count-python", "word_count_python"),
        ("word-count-js", "word_count_js"),
    ] {
        let Some(file) = opspawn_testkit::script_plugins::built_example(example) else {
            println!("  {example}: not built (scripts/common.sh build_script_plugins builds it)");
            continue;
        };
        let check = |output: &Value| {
            if output["words"] == 9 {
                Ok(())
            } else {
                bail!("{tool} answered {output}, not 9 words")
            }
        };
        let fresh = "[limits]\nmemory_mib = 64\n";
        let warm = "[limits]\nmemory_mib = 64\n[instances]\nreuse = \"tenant\"\n";
        let mut medians = Vec::new();
        for (label, manifest) in [("fresh", fresh), ("warm", warm)] {
            let samples = time_tool(args.calls, &file, Some(manifest), tool, &input, check).await?;
            println!(
                "  {:<36}{:>12}{:>12}",
                format!("{example}, {label}"),
                micros(samples.percentile(0.5)),
                micros(samples.percentile(0.9))
            );
            medians.push(samples.percentile(0.5).as_secs_f64());
        }
        row(
            &format!("{example}: fresh / warm"),
            format!("{:.1}x", medians[0] / medians[1]),
        );
    }
    Ok(())
}

/// Calls `tool` through the host's plugin runtime, loaded from a folder
/// holding only `wasm` (with `manifest`, if given).
async fn time_tool(
    calls: usize,
    wasm: &std::path::Path,
    manifest: Option<&str>,
    tool: &str,
    input: &Value,
    check: impl Fn(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<Samples> {
    let folder = PluginFolder::new();
    let name = wasm
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or(tool);
    folder.add_file(name, wasm, manifest);
    let runtime = PluginRuntime::new(RuntimeOptions {
        plugin_dir: folder.path().to_owned(),
        cache_dir: None,
        default_limits: Limits::default(),
        policy: OperatorPolicy::default(),
        engine: EngineOptions::default(),
        concurrent_calls: opspawn::plugins::default_concurrent_calls(),
        server_env: Vec::new(),
        server_dirs: Vec::new(),
        max_load_time: std::time::Duration::from_secs(120),
        max_old_versions: 4,
        compile_cache_history: 8,
        missing_plugin_grace: std::time::Duration::ZERO,
        separate_tenants: false,
        stream_batch_window: opspawn::plugins::stream_batch_window(
            opspawn::events::EventsConfig::default().delta_interval,
        ),
    })?;
    runtime.scan().await?;
    if let Some(failure) = runtime.catalog().failures().first() {
        bail!("{} did not load: {}", failure.file.display(), failure.error);
    }
    let tools = [tool.to_owned()];
    let names = TaskPluginNames {
        planner: None,
        llm: None,
        tools: &tools,
    };
    let (plugins, _) = runtime
        .hold_task_plugins(names, &RecordedVersions::default())
        .await?;
    let call = async |n: u32| {
        let context = CallContext::new("bench", n);
        let no_trace = TraceSpan::none();
        Ok(runtime
            .invoke_tool(&plugins, tool, &context, input, &no_trace)
            .await?)
    };
    measure(calls, call, check).await
}

/// What a bare store holds: WASI and its resource table, nothing else.
pub(crate) struct BareState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Calls the calculator on bare wasmtime: per call a fresh store,
/// instantiate, `invoke`.
pub(crate) async fn time_bare(pooling: bool, calls: usize) -> anyhow::Result<Samples> {
    let engine = bare_engine(pooling)?;
    let component = Component::from_file(&engine, opspawn_testkit::wasm("calculator"))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    let pre = ToolPre::new(linker.instantiate_pre(&component)?)?;
    let input = json!({ "expression": EXPRESSION }).to_string();
    let call = async |n: u32| {
        let state = BareState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&engine, state);
        // Epoch interruption is on, as in the host, but nothing ticks.
        store.set_epoch_deadline(u64::MAX / 2);
        let tool = pre.instantiate_async(&mut store).await?;
        let context = types::CallContext {
            task_id: "bench".into(),
            step: n,
            idempotency_key: format!("bench:{n}"),
        };
        tool.opspawn_plugin_tools()
            .call_invoke(&mut store, &context, "calculator", &input)
            .await?
            .map_err(|e| anyhow!("the calculator failed: {}: {}", e.code, e.message))
    };
    let check = |output: &String| {
        let output: Value = serde_json::from_str(output)?;
        check_answer(&output["result"])
    };
    measure(calls, call, check).await
}

/// An engine configured exactly as the host's, optionally without pooling.
pub(crate) fn bare_engine(pooling: bool) -> anyhow::Result<Engine> {
    let options = EngineOptions {
        pooling,
        ..EngineOptions::default()
    };
    build_engine(&options).map_err(|e| anyhow::anyhow!("{e:#}"))
}

pub(crate) fn check_answer(result: &Value) -> anyhow::Result<()> {
    if result.as_f64() != Some(ANSWER) {
        bail!("{EXPRESSION} gave {result}, not {ANSWER}");
    }
    Ok(())
}

/// Makes [`WARM_UP_CALLS`] calls, checking each answer, then times `calls`
/// more, one at a time.
pub(crate) async fn measure<T>(
    calls: usize,
    mut call: impl AsyncFnMut(u32) -> anyhow::Result<T>,
    check: impl Fn(&T) -> anyhow::Result<()>,
) -> anyhow::Result<Samples> {
    for n in 0..WARM_UP_CALLS {
        check(&call(n as u32).await?)?;
    }
    let mut times = Vec::with_capacity(calls);
    for n in 0..calls {
        let started = Instant::now();
        let output = call(n as u32).await?;
        times.push(started.elapsed());
        drop(output);
    }
    Ok(Samples::new(times))
}
