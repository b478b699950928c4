//! Warm instances: plugins (tools, planners, LLM adapters) whose manifest
//! asks for it (`[instances] reuse`) keep an instance after a call and hand
//! it to the next call of the same plugin version in the same scope (one
//! task, or one tenant), instead of instantiating afresh. For an
//! interpreter compiled to WebAssembly (componentize-py, componentize-js) a
//! fresh instance costs milliseconds; a warm one costs what the call itself
//! does. A Rust planner or adapter costs tens of microseconds afresh, called
//! several times per task.
//!
//! What is kept: the instance's `Store`, its typed exports, and the
//! instance slot it holds (so the engine's pool is never asked for more
//! instances than it has). What a warm instance may carry from one call to
//! the next is whatever the plugin keeps in its own memory and the handles
//! it keeps open: never another tenant's, since the scope always includes
//! the tenant. An instance is dropped, not kept, after a call that failed
//! in any way (a trap, a timeout, a limit), after `max_calls` calls, after
//! `max_idle` unused, and when the host holds `max_idle_instances` idle
//! ones and needs room for another (the longest idle goes first).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;

use super::manifest::{InstanceReuse, ReuseScope};
use super::registry::Plugin;
use super::state::CallState;

/// Which calls may take an idle instance: the same loaded plugin version
/// (its address; the idle instance holds the plugin, so the address is not
/// reused meanwhile) and the same task or tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct WarmKey {
    plugin: usize,
    scope: String,
}

impl WarmKey {
    /// The key of a call of `plugin`, when its instances are reused and
    /// the call names what they are scoped to. The tenant is part of every
    /// scope: a task id is unique, but a tenant's key holds no task of
    /// another tenant's by construction.
    pub fn of(
        plugin: &Arc<Plugin>,
        reuse: &InstanceReuse,
        tenant: Option<&str>,
        task: &str,
    ) -> Self {
        let tenant = tenant.unwrap_or("");
        let scope = match reuse.scope {
            ReuseScope::Call => unreachable!("no reuse is no InstanceReuse"),
            ReuseScope::Task => format!("task\0{tenant}\0{task}"),
            ReuseScope::Tenant => format!("tenant\0{tenant}"),
        };
        Self {
            plugin: Arc::as_ptr(plugin) as usize,
            scope,
        }
    }
}

/// An instance between calls.
pub(super) struct Idle {
    store: Store<CallState>,
    /// The instance's typed exports (the bindings of its WIT world).
    exports: Box<dyn Any + Send>,
    /// The engine instance slot it occupies.
    slot: OwnedSemaphorePermit,
    /// Calls it has served.
    calls: u32,
    since: Instant,
    max_idle: Duration,
    /// Keeps the plugin version (and so the key's address) alive.
    _plugin: Arc<Plugin>,
}

impl Idle {
    pub fn new(
        store: Store<CallState>,
        exports: Box<dyn Any + Send>,
        slot: OwnedSemaphorePermit,
        calls: u32,
        plugin: Arc<Plugin>,
        max_idle: Duration,
    ) -> Self {
        Self {
            store,
            exports,
            slot,
            calls,
            since: Instant::now(),
            max_idle,
            _plugin: plugin,
        }
    }

    /// Its store, exports, instance slot and how many calls it served.
    pub fn into_parts(
        self,
    ) -> (
        Store<CallState>,
        Box<dyn Any + Send>,
        OwnedSemaphorePermit,
        u32,
    ) {
        (self.store, self.exports, self.slot, self.calls)
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.since) >= self.max_idle
    }
}

/// The idle instances of this host.
pub(super) struct WarmInstances {
    idle: Mutex<IdleSet>,
    max_idle_instances: usize,
}

#[derive(Default)]
struct IdleSet {
    by_key: HashMap<WarmKey, Vec<Idle>>,
    count: usize,
}

impl IdleSet {
    /// Takes out every idle instance past its idle time.
    fn expire(&mut self, now: Instant, dropped: &mut Vec<Idle>) {
        if self.count == 0 {
            return;
        }
        self.by_key.retain(|_, idle| {
            let (expired, kept): (Vec<Idle>, Vec<Idle>) =
                idle.drain(..).partition(|i| i.expired(now));
            dropped.extend(expired);
            *idle = kept;
            !idle.is_empty()
        });
        self.count = self.by_key.values().map(Vec::len).sum();
    }

    /// Takes out the instance idle longest.
    fn evict_oldest(&mut self) -> Option<Idle> {
        let key = self
            .by_key
            .iter()
            .filter_map(|(key, idle)| idle.first().map(|oldest| (key, oldest.since)))
            .min_by_key(|(_, since)| *since)
            .map(|(key, _)| key.clone())?;
        let idle = self.by_key.get_mut(&key)?;
        let oldest = idle.remove(0);
        if idle.is_empty() {
            self.by_key.remove(&key);
        }
        self.count -= 1;
        Some(oldest)
    }
}

impl WarmInstances {
    pub fn new(max_idle_instances: usize) -> Arc<Self> {
        let warm = Arc::new(Self {
            idle: Mutex::default(),
            max_idle_instances,
        });
        // Instances idle past their time are dropped even when no call
        // comes to notice.
        if max_idle_instances > 0
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(sweep(Arc::downgrade(&warm)));
        }
        warm
    }

    /// The instance idle shortest under `key`, if there is one.
    pub fn take(&self, key: &WarmKey) -> Option<Idle> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let taken = {
            let mut set = self.idle.lock().unwrap();
            let idle = set.by_key.get_mut(key)?;
            let mut taken = None;
            while let Some(instance) = idle.pop() {
                if instance.expired(now) {
                    dropped.push(instance);
                } else {
                    taken = Some(instance);
                    break;
                }
            }
            let left = idle.len();
            if left == 0 {
                set.by_key.remove(key);
            }
            set.count -= dropped.len() + usize::from(taken.is_some());
            taken
        };
        // Instances are dropped outside the lock: freeing one takes a while.
        drop(dropped);
        taken
    }

    /// Keeps `instance` for the next call under `key`, making room when the
    /// host holds as many idle instances as it may.
    pub fn keep(&self, key: WarmKey, instance: Idle) {
        if self.max_idle_instances == 0 {
            return;
        }
        let mut dropped = Vec::new();
        {
            let mut set = self.idle.lock().unwrap();
            set.expire(Instant::now(), &mut dropped);
            while set.count >= self.max_idle_instances {
                match set.evict_oldest() {
                    Some(oldest) => dropped.push(oldest),
                    None => break,
                }
            }
            set.by_key.entry(key).or_default().push(instance);
            set.count += 1;
        }
        drop(dropped);
    }

    fn expire(&self) {
        let mut dropped = Vec::new();
        self.idle
            .lock()
            .unwrap()
            .expire(Instant::now(), &mut dropped);
        drop(dropped);
    }
}

/// Drops expired idle instances every second, until the runtime goes.
async fn sweep(warm: Weak<WarmInstances>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(warm) = warm.upgrade() else {
            return;
        };
        warm.expire();
    }
}
