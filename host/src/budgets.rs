//! Money and token budgets: the price table, what an LLM call may cost at
//! worst, and the per-host reservations that keep many calls of one tenant
//! from all passing the check on the same remaining budget.
//!
//! Amounts of money are whole nano-dollars (`i64`, 10⁻⁹ USD): a price of
//! $0.075 per million tokens is 75 nano-dollars a token, so integer
//! arithmetic adds costs up exactly, in any order, on both engines.
//!
//! The store keeps what was spent (the task's `cost_nanos`, the tenant's
//! `tenant_usage` row for the period); this module only decides. See
//! docs/architecture.md, "Budgets".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{ChatRequest, Usage};
use crate::store::Millis;

/// Nano-dollars in a dollar.
pub const NANOS_PER_USD: f64 = 1e9;

/// Output tokens a call is assumed to produce (and is asked to stop at)
/// when a budget applies and neither the request nor `options.llm` sets
/// `max_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 4096;

/// How many request bytes count as one input token in the estimate. Real
/// tokenizers average about four bytes of English or JSON per token; three
/// leaves room for text that tokenizes worse.
pub const BYTES_PER_TOKEN_ESTIMATE: u64 = 3;

/// What an image counts as in the estimate, in input tokens, whatever its
/// bytes: providers charge by pixels, not bytes, and scale a large image
/// down first. The most any of them charges for one at its default detail
/// is about this (GPT-4.1 mini's 1,536 patches, times its multiplier).
pub const TOKENS_PER_IMAGE_ESTIMATE: u64 = 2_500;

/// A model's price in US dollars per million tokens, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// `[prices.<adapter>."<model>"]`: the price of each model of each LLM
/// adapter; the model `"*"` prices every model of that adapter not named.
pub type PriceTable = BTreeMap<String, BTreeMap<String, Price>>;

/// The prices every configuration starts from: the scripted adapter, which
/// calls no provider, is free.
pub fn default_prices() -> PriceTable {
    let free = Price {
        input_per_million: 0.0,
        output_per_million: 0.0,
    };
    BTreeMap::from([(
        "scripted".to_owned(),
        BTreeMap::from([("*".to_owned(), free)]),
    )])
}

/// A price in nano-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NanoPrice {
    pub input: i64,
    pub output: i64,
}

impl NanoPrice {
    fn from_usd(price: &Price) -> Result<Self, String> {
        let nanos = |usd: f64, what: &str| {
            if usd.is_finite() && (0.0..=1e6).contains(&usd) {
                Ok((usd * NANOS_PER_USD).round() as i64)
            } else {
                Err(format!(
                    "{what} must be a number of dollars from 0 to 1000000, not {usd}"
                ))
            }
        };
        Ok(Self {
            input: nanos(price.input_per_million, "input_per_million")?,
            output: nanos(price.output_per_million, "output_per_million")?,
        })
    }

    /// What `input` and `output` tokens cost, in nano-dollars, rounded up.
    pub fn cost(&self, input: u64, output: u64) -> i64 {
        let micro = i128::from(input) * i128::from(self.input)
            + i128::from(output) * i128::from(self.output);
        let nanos = (micro + 999_999) / 1_000_000;
        i64::try_from(nanos).unwrap_or(i64::MAX)
    }
}

/// The calendar span a tenant's budget covers; periods are UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The period holding `at`: its key in the store (`day:2026-12-02`,
    /// `month:2026-12`), its first millisecond and the first of the next.
    pub fn at(self, at: Millis) -> PeriodSpan {
        const DAY: i64 = 86_400_000;
        let day = at.div_euclid(DAY);
        let (year, month, date) = civil_from_days(day);
        match self {
            Self::Day => PeriodSpan {
                key: format!("day:{year:04}-{month:02}-{date:02}"),
                start: day * DAY,
                end: (day + 1) * DAY,
            },
            Self::Month => {
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                PeriodSpan {
                    key: format!("month:{year:04}-{month:02}"),
                    start: days_from_civil(year, month, 1) * DAY,
                    end: days_from_civil(next_year, next_month, 1) * DAY,
                }
            }
        }
    }
}

/// One period of a tenant's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSpan {
    /// How the store names it.
    pub key: String,
    pub start: Millis,
    pub end: Millis,
}

/// (year, month, day) of the `days`-th day after 1970-01-01; Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A tenant's cap per period, as configured (`[budgets.default]`,
/// `[budgets.tenants.<name>]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantCapConfig {
    pub period: Period,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

/// `[budgets]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetsConfig {
    /// The output a call is assumed to produce, and is asked to stop at,
    /// when a budget applies and the call sets no `max_tokens`.
    pub default_max_output_tokens: u32,
    /// Every tenant's cap, unless `tenants` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<TenantCapConfig>,
    /// Caps of named tenants, in place of `default` (a cap with neither
    /// maximum exempts the tenant).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, TenantCapConfig>,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            default_max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
            default: None,
            tenants: BTreeMap::new(),
        }
    }
}

/// A tenant's cap, ready to check against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCap {
    pub period: Period,
    pub max_tokens: Option<u64>,
    pub max_cost_nanos: Option<i64>,
}

/// A task's own caps (`budget` when it was submitted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TaskBudget {
    pub max_tokens: Option<u64>,
    pub max_cost_nanos: Option<i64>,
}

impl TaskBudget {
    pub fn is_empty(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost_nanos.is_none()
    }
}

/// Dollars as nano-dollars, for a cap: a finite amount from 0 to a
/// million dollars.
pub fn usd_to_nanos(usd: f64) -> Option<i64> {
    (usd.is_finite() && (0.0..=1e6).contains(&usd)).then(|| (usd * NANOS_PER_USD).round() as i64)
}

pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// What a tenant spent in one period, as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `None` once a call of a model with no price was counted.
    pub cost_nanos: Option<i64>,
}

impl Default for PeriodUsage {
    fn default() -> Self {
        Self {
            input_tokens: 0,
            output_tokens: 0,
            cost_nanos: Some(0),
        }
    }
}

impl PeriodUsage {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// What a step's usage adds to its tenant's period, journaled in the same
/// write as the step's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCharge {
    pub tenant: String,
    /// The period's key ([`PeriodSpan::key`]).
    pub period: String,
}

/// The most an LLM call may use: its input, estimated from the request's
/// size, and its output, bounded by its `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub request_bytes: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `None` when the model has no price.
    pub cost_nanos: Option<i64>,
}

impl Estimate {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// The largest output `request` allows: `options.llm.max_tokens` (which
/// the HTTP adapters send in place of the request's own), the request's
/// `max_tokens`, or none.
pub fn max_output_tokens(request: &ChatRequest) -> Option<u64> {
    request
        .provider_options
        .get("max_tokens")
        .and_then(Value::as_u64)
        .or(request.max_tokens.map(u64::from))
}

/// Why a call was not made; the message says which cap, what is used and
/// left, and how to raise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    /// The cap is on cost and the call's model (or usage already counted)
    /// has no price: `budget_unpriced` rather than `budget_exceeded`.
    pub unpriced: bool,
}

/// The configured prices and caps, and this host's reservations.
#[derive(Debug)]
pub struct Budgets {
    prices: HashMap<String, HashMap<String, NanoPrice>>,
    default_cap: Option<TenantCap>,
    tenant_caps: HashMap<String, Option<TenantCap>>,
    default_max_output_tokens: u32,
    ledger: Arc<Mutex<HashMap<LedgerKey, Ledger>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LedgerKey {
    tenant: String,
    period: String,
}

impl Default for Budgets {
    /// The default prices (the scripted adapter is free) and no caps.
    fn default() -> Self {
        Self::new(&default_prices(), &BudgetsConfig::default())
            .expect("the default prices and budgets are valid")
    }
}

/// One tenant's period on this host.
#[derive(Debug, Default)]
struct Ledger {
    /// Held by calls in flight, or whose usage is not journaled yet.
    reserved_tokens: u64,
    reserved_cost: i64,
    /// Usage of every reservation released so far (monotonic): what a
    /// check adds for settlements that may have missed its read.
    released_tokens: u64,
    released_cost: i64,
    /// The last read of the period's usage from the store, reused by checks
    /// for [`STORE_READ_MAX_AGE`].
    last_read: Option<StoreRead>,
}

/// How long one read of a tenant's period usage serves this host's checks.
/// What this host settles meanwhile is counted through the read's mark, so
/// only other hosts' usage can be this much older than it would be with a
/// read per check.
pub const STORE_READ_MAX_AGE: Duration = Duration::from_millis(100);

/// A read of the store's usage row, with the mark taken before it.
#[derive(Debug, Clone, Copy)]
struct StoreRead {
    at: Instant,
    mark: LedgerMark,
    used: PeriodUsage,
}

/// The ledger of `key`, made when missing; periods that ended and hold
/// nothing are forgotten when a new one starts.
fn ledger_entry<'a>(ledger: &'a mut HashMap<LedgerKey, Ledger>, key: &LedgerKey) -> &'a mut Ledger {
    if !ledger.contains_key(key) {
        ledger
            .retain(|k, l| k.period == key.period || l.reserved_tokens > 0 || l.reserved_cost > 0);
    }
    ledger.entry(key.clone()).or_default()
}

/// Where a tenant check stands before it reads the store: see
/// [`Budgets::reserve_for_tenant`].
#[derive(Debug, Clone, Copy)]
pub struct LedgerMark {
    released_tokens: u64,
    released_cost: i64,
}

impl Budgets {
    pub fn new(prices: &PriceTable, config: &BudgetsConfig) -> Result<Self, String> {
        let mut table = HashMap::new();
        for (adapter, models) in prices {
            let mut priced = HashMap::new();
            for (model, price) in models {
                let price = NanoPrice::from_usd(price)
                    .map_err(|e| format!("[prices.{adapter}.\"{model}\"]: {e}"))?;
                priced.insert(model.clone(), price);
            }
            table.insert(adapter.clone(), priced);
        }
        let cap = |name: &str, cap: &TenantCapConfig| -> Result<Option<TenantCap>, String> {
            let max_cost_nanos = match cap.max_cost_usd {
                None => None,
                Some(usd) => Some(usd_to_nanos(usd).ok_or_else(|| {
                    format!("{name}: max_cost_usd must be from 0 to 1000000, not {usd}")
                })?),
            };
            Ok(
                (cap.max_tokens.is_some() || max_cost_nanos.is_some()).then_some(TenantCap {
                    period: cap.period,
                    max_tokens: cap.max_tokens,
                    max_cost_nanos,
                }),
            )
        };
        let default_cap = match &config.default {
            Some(default) => cap("[budgets.default]", default)?,
            None => None,
        };
        let mut tenant_caps = HashMap::new();
        for (tenant, tenant_cap) in &config.tenants {
            tenant_caps.insert(
                tenant.clone(),
                cap(&format!("[budgets.tenants.{tenant}]"), tenant_cap)?,
            );
        }
        if config.default_max_output_tokens == 0 {
            return Err("[budgets] default_max_output_tokens must be at least 1".into());
        }
        Ok(Self {
            prices: table,
            default_cap,
            tenant_caps,
            default_max_output_tokens: config.default_max_output_tokens,
            ledger: Arc::default(),
        })
    }

    /// The price of `model` (or, for a request naming none, the adapter's
    /// `"*"`) on `adapter`; `None` when the table has neither.
    pub fn price(&self, adapter: &str, model: Option<&str>) -> Option<NanoPrice> {
        let models = self.prices.get(adapter)?;
        model
            .and_then(|model| models.get(model))
            .or_else(|| models.get("*"))
            .copied()
    }

    /// What `usage` cost on `adapter`'s `model`; `None` when unpriced.
    pub fn cost(&self, adapter: &str, model: Option<&str>, usage: &Usage) -> Option<i64> {
        self.price(adapter, model)
            .map(|price| price.cost(usage.input_tokens, usage.output_tokens))
    }

    /// The cap `tenant` works under, if any.
    pub fn tenant_cap(&self, tenant: &str) -> Option<TenantCap> {
        match self.tenant_caps.get(tenant) {
            Some(cap) => *cap,
            None => self.default_cap,
        }
    }

    /// Whether any tenant has a cap: without one, nothing is tracked.
    pub fn any_tenant_cap(&self) -> bool {
        self.default_cap.is_some() || self.tenant_caps.values().any(Option::is_some)
    }

    pub fn default_max_output_tokens(&self) -> u32 {
        self.default_max_output_tokens
    }

    /// The worst case of sending `request` to `adapter`.
    pub fn estimate(&self, adapter: &str, request: &ChatRequest) -> Estimate {
        let images = crate::images::count(request) as u64;
        let bytes = |request: &ChatRequest| {
            serde_json::to_vec(request).map_or(0, |bytes| bytes.len() as u64)
        };
        // An image counts by its own estimate, not its bytes.
        let request_bytes = if images == 0 {
            bytes(request)
        } else {
            let mut text_only = request.clone();
            text_only.messages.iter_mut().for_each(|m| m.images.clear());
            bytes(&text_only)
        };
        let input_tokens =
            request_bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE) + images * TOKENS_PER_IMAGE_ESTIMATE;
        let output_tokens =
            max_output_tokens(request).unwrap_or(u64::from(self.default_max_output_tokens));
        Estimate {
            request_bytes,
            input_tokens,
            output_tokens,
            cost_nanos: self
                .price(adapter, request.model.as_deref())
                .map(|price| price.cost(input_tokens, output_tokens)),
        }
    }

    /// The tenant's period usage as this host last read it from the store,
    /// with the mark taken before that read, when the read is younger than
    /// [`STORE_READ_MAX_AGE`]: handed to [`Budgets::reserve_for_tenant`] in
    /// place of a new read, it counts everything this host settled since
    /// (through the mark), as a new read would.
    pub fn recent_read(&self, tenant: &str, period: &str) -> Option<(LedgerMark, PeriodUsage)> {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let read = ledger
            .get(&LedgerKey {
                tenant: tenant.to_owned(),
                period: period.to_owned(),
            })?
            .last_read?;
        (read.at.elapsed() < STORE_READ_MAX_AGE).then_some((read.mark, read.used))
    }

    /// Keeps a read of the store (and the mark taken before it) for
    /// [`Budgets::recent_read`].
    pub fn note_read(&self, tenant: &str, period: &str, mark: LedgerMark, used: PeriodUsage) {
        let key = LedgerKey {
            tenant: tenant.to_owned(),
            period: period.to_owned(),
        };
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger_entry(&mut ledger, &key).last_read = Some(StoreRead {
            at: Instant::now(),
            mark,
            used,
        });
    }

    /// Taken before reading the tenant's usage from the store, and handed
    /// to [`Budgets::reserve_for_tenant`] with what was read.
    pub fn mark(&self, tenant: &str, period: &str) -> LedgerMark {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = ledger.get(&LedgerKey {
            tenant: tenant.to_owned(),
            period: period.to_owned(),
        });
        LedgerMark {
            released_tokens: entry.map_or(0, |e| e.released_tokens),
            released_cost: entry.map_or(0, |e| e.released_cost),
        }
    }

    /// Holds `estimate` against `tenant`'s cap for `period`, or says why
    /// not. `used` is what the store held when read after `mark`.
    ///
    /// Reservations are released (with the real usage) only once that usage
    /// is journaled, and a release counts what it settles: so whatever was
    /// settled between the mark and now, whether or not the read saw it, is
    /// counted (twice, at worst), and whatever is not settled is still
    /// reserved. The check can overcount, never undercount, what this host
    /// has spent.
    pub fn reserve_for_tenant(
        &self,
        tenant: &str,
        cap: &TenantCap,
        period: &PeriodSpan,
        mark: LedgerMark,
        used: PeriodUsage,
        estimate: &Estimate,
    ) -> Result<Reservation, Refusal> {
        let key = LedgerKey {
            tenant: tenant.to_owned(),
            period: period.key.clone(),
        };
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = ledger_entry(&mut ledger, &key);
        let settled_since_tokens = entry.released_tokens.saturating_sub(mark.released_tokens);
        let settled_since_cost = entry.released_cost.saturating_sub(mark.released_cost);
        let spent_tokens = used.tokens() + settled_since_tokens;
        let spent_cost = used.cost_nanos.map(|cost| cost + settled_since_cost);
        let tokens = check_cap(
            cap.max_tokens,
            spent_tokens,
            entry.reserved_tokens,
            estimate.tokens(),
        );
        if let Err((left, held)) = tokens {
            let max = cap.max_tokens.unwrap_or_default();
            return Err(Refusal {
                unpriced: false,
                message: format!(
                    "this LLM call could use up to {} tokens ({}), but tenant {tenant:?}'s {} \
                     budget has {left} of its {max} tokens left ({spent_tokens} used, {held} held \
                     by calls in flight) until {}; raise max_tokens of [budgets.tenants.{tenant}] \
                     (or [budgets.default]) in the server's configuration, or wait for the next \
                     period",
                    estimate.tokens(),
                    describe(estimate),
                    cap.period.as_str(),
                    crate::rfc3339::format(period.end),
                ),
            });
        }
        let mut cost = 0;
        if cap.max_cost_nanos.is_some() {
            let Some(estimated) = estimate.cost_nanos else {
                return Err(unpriced_refusal(&format!(
                    "tenant {tenant:?}'s cost budget"
                )));
            };
            let Some(spent_cost) = spent_cost else {
                return Err(Refusal {
                    unpriced: true,
                    message: format!(
                        "tenant {tenant:?}'s cost budget cannot be enforced: its usage this {} \
                         includes calls of models with no price; add them to [prices] in the \
                         server's configuration",
                        cap.period.as_str()
                    ),
                });
            };
            cost = estimated;
            if let Err((left, held)) = check_cost(
                cap.max_cost_nanos,
                spent_cost,
                entry.reserved_cost,
                estimated,
            ) {
                return Err(Refusal {
                    unpriced: false,
                    message: format!(
                        "this LLM call could cost up to ${} ({}), but tenant {tenant:?}'s {} \
                         budget has ${} of its ${} left (${} used, ${} held by calls in flight) \
                         until {}; raise max_cost_usd of [budgets.tenants.{tenant}] (or \
                         [budgets.default]) in the server's configuration, or wait for the next \
                         period",
                        usd(estimated),
                        describe(estimate),
                        cap.period.as_str(),
                        usd(left),
                        usd(cap.max_cost_nanos.unwrap_or_default()),
                        usd(spent_cost),
                        usd(held),
                        crate::rfc3339::format(period.end),
                    ),
                });
            }
        }
        entry.reserved_tokens += estimate.tokens();
        entry.reserved_cost += cost;
        Ok(Reservation {
            ledger: self.ledger.clone(),
            key,
            tokens: estimate.tokens(),
            cost,
            settled: None,
        })
    }

    /// What this host holds for calls in flight of `tenant` in `period`.
    pub fn reserved(&self, tenant: &str, period: &str) -> (u64, i64) {
        let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger
            .get(&LedgerKey {
                tenant: tenant.to_owned(),
                period: period.to_owned(),
            })
            .map_or((0, 0), |e| (e.reserved_tokens, e.reserved_cost))
    }
}

/// Checks a task's own caps: what it spent so far (`spent_cost` `None`
/// when some of it was unpriced) plus the call's worst case.
pub fn check_task(
    budget: &TaskBudget,
    spent: &Usage,
    spent_cost: Option<i64>,
    estimate: &Estimate,
) -> Result<(), Refusal> {
    let spent_tokens = spent.input_tokens + spent.output_tokens;
    if let Err((left, _)) = check_cap(budget.max_tokens, spent_tokens, 0, estimate.tokens()) {
        return Err(Refusal {
            unpriced: false,
            message: format!(
                "this LLM call could use up to {} tokens ({}), but the task's budget has {left} \
                 of its {} tokens left ({spent_tokens} used); submit the task with a larger \
                 budget.max_tokens, or a smaller max_tokens in options.llm",
                estimate.tokens(),
                describe(estimate),
                budget.max_tokens.unwrap_or_default(),
            ),
        });
    }
    if budget.max_cost_nanos.is_some() {
        let (Some(estimated), Some(spent_cost)) = (estimate.cost_nanos, spent_cost) else {
            return Err(unpriced_refusal("the task's cost budget"));
        };
        if let Err((left, _)) = check_cost(budget.max_cost_nanos, spent_cost, 0, estimated) {
            return Err(Refusal {
                unpriced: false,
                message: format!(
                    "this LLM call could cost up to ${} ({}), but the task's budget has ${} of \
                     its ${} left (${} used); submit the task with a larger \
                     budget.max_cost_usd, or a smaller max_tokens in options.llm",
                    usd(estimated),
                    describe(estimate),
                    usd(left),
                    usd(budget.max_cost_nanos.unwrap_or_default()),
                    usd(spent_cost),
                ),
            });
        }
    }
    Ok(())
}

fn unpriced_refusal(cap: &str) -> Refusal {
    Refusal {
        unpriced: true,
        message: format!(
            "{cap} cannot be enforced: the model of this LLM call has no price; add it to \
             [prices] in the server's configuration"
        ),
    }
}

/// `Err((left, held))` when `spent + held + asked` passes `max`.
fn check_cap(max: Option<u64>, spent: u64, held: u64, asked: u64) -> Result<(), (u64, u64)> {
    match max {
        Some(max) if spent.saturating_add(held).saturating_add(asked) > max => {
            Err((max.saturating_sub(spent).saturating_sub(held), held))
        }
        _ => Ok(()),
    }
}

fn check_cost(max: Option<i64>, spent: i64, held: i64, asked: i64) -> Result<(), (i64, i64)> {
    match max {
        Some(max) if spent.saturating_add(held).saturating_add(asked) > max => {
            Err(((max - spent - held).max(0), held))
        }
        _ => Ok(()),
    }
}

fn describe(estimate: &Estimate) -> String {
    format!(
        "{} input, estimated from the request's {} bytes, and at most {} output",
        estimate.input_tokens, estimate.request_bytes, estimate.output_tokens
    )
}

/// Dollars, with as many decimals as a nano-dollar amount needs.
pub fn usd(nanos: i64) -> String {
    let text = format!("{:.9}", nanos_to_usd(nanos));
    let text = text.trim_end_matches('0');
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.contains('.') {
        text.to_owned()
    } else {
        format!("{text}.00")
    }
}

/// A tenant's budget held for one LLM call, released when dropped: after
/// the call's usage is journaled, or when the call is not made after all.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Mutex<HashMap<LedgerKey, Ledger>>>,
    key: LedgerKey,
    tokens: u64,
    cost: i64,
    /// What the call really used, once known.
    settled: Option<(u64, i64)>,
}

impl Reservation {
    /// Records the call's real usage, counted when the reservation is
    /// released.
    pub fn settle(&mut self, tokens: u64, cost: i64) {
        self.settled = Some((tokens, cost));
    }

    /// The charge to journal with the step's end.
    pub fn charge(&self) -> TenantCharge {
        TenantCharge {
            tenant: self.key.tenant.clone(),
            period: self.key.period.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = ledger.get_mut(&self.key) {
            entry.reserved_tokens = entry.reserved_tokens.saturating_sub(self.tokens);
            entry.reserved_cost = (entry.reserved_cost - self.cost).max(0);
            let (tokens, cost) = self.settled.unwrap_or((0, 0));
            entry.released_tokens += tokens;
            entry.released_cost += cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChatMessage, Role};

    fn request(model: Option<&str>, text: &str, max_tokens: Option<u32>) -> ChatRequest {
        ChatRequest {
            model: model.map(str::to_owned),
            system: None,
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.to_owned(),
                images: vec![],
                tool_calls: vec![],
                tool_call_id: None,
                provider_data: vec![],
            }],
            tools: vec![],
            tool_choice: Default::default(),
            parallel_tool_calls: None,
            response_format: None,
            temperature: None,
            top_p: None,
            max_tokens,
            stop: vec![],
            provider_options: serde_json::json!({}),
        }
    }

    fn budgets(config: &str) -> Budgets {
        #[derive(Deserialize)]
        struct Both {
            #[serde(default = "default_prices")]
            prices: PriceTable,
            #[serde(default)]
            budgets: BudgetsConfig,
        }
        let both: Both = toml::from_str(config).unwrap();
        Budgets::new(&both.prices, &both.budgets).unwrap()
    }

    const OPENAI: &str = r#"
        [prices.openai."gpt-4o-mini"]
        input_per_million = 0.15
        output_per_million = 0.6
        [prices.openai."*"]
        input_per_million = 2.5
        output_per_million = 10
    "#;

    #[test]
    fn cost_is_exact_in_nano_dollars_and_rounds_up() {
        let b = budgets(OPENAI);
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
        };
        assert_eq!(
            b.cost("openai", Some("gpt-4o-mini"), &usage),
            Some(750_000_000),
            "$0.15 + $0.60"
        );
        assert_eq!(
            b.cost("openai", Some("gpt-4o"), &usage),
            Some(12_500_000_000),
            "an unnamed model takes the adapter's \"*\" price"
        );
        let one = Usage {
            input_tokens: 1,
            output_tokens: 0,
        };
        assert_eq!(b.cost("openai", Some("gpt-4o-mini"), &one), Some(150));
        let cheap = NanoPrice {
            input: 500_000,
            output: 0,
        };
        assert_eq!(
            cheap.cost(1, 0),
            1,
            "half a nano-dollar rounds up to 1, never down to free"
        );
        assert_eq!(b.cost("anthropic", Some("claude"), &usage), None);
        assert_eq!(
            Budgets::default().cost("scripted", None, &usage),
            Some(0),
            "the scripted adapter is free by default"
        );
        assert_eq!(usd(750_000_000), "0.75");
        assert_eq!(usd(150), "0.00000015");
        assert_eq!(usd(3_000_000_000), "3.00");
    }

    #[test]
    fn bad_prices_and_caps_are_refused() {
        let mut prices = default_prices();
        prices.entry("openai".into()).or_default().insert(
            "m".into(),
            Price {
                input_per_million: -1.0,
                output_per_million: 0.0,
            },
        );
        let error = Budgets::new(&prices, &BudgetsConfig::default()).unwrap_err();
        assert!(error.contains("prices.openai.\"m\""), "{error}");
        let config = BudgetsConfig {
            default: Some(TenantCapConfig {
                period: Period::Day,
                max_tokens: None,
                max_cost_usd: Some(f64::NAN),
            }),
            ..BudgetsConfig::default()
        };
        assert!(Budgets::new(&default_prices(), &config).is_err());
    }

    #[test]
    fn the_estimate_is_bytes_over_three_plus_the_largest_output() {
        let b = budgets(OPENAI);
        let req = request(Some("gpt-4o-mini"), "hello", Some(100));
        let bytes = serde_json::to_vec(&req).unwrap().len() as u64;
        let estimate = b.estimate("openai", &req);
        assert_eq!(estimate.request_bytes, bytes);
        assert_eq!(estimate.input_tokens, bytes.div_ceil(3));
        assert_eq!(estimate.output_tokens, 100);
        assert_eq!(
            estimate.cost_nanos,
            Some(
                NanoPrice {
                    input: 150_000_000,
                    output: 600_000_000
                }
                .cost(bytes.div_ceil(3), 100)
            )
        );

        let mut from_options = req.clone();
        from_options.provider_options = serde_json::json!({"max_tokens": 7});
        assert_eq!(
            b.estimate("openai", &from_options).output_tokens,
            7,
            "options.llm.max_tokens wins, as the adapters send it"
        );
        let unbounded = request(Some("gpt-4o-mini"), "hello", None);
        assert_eq!(
            b.estimate("openai", &unbounded).output_tokens,
            u64::from(DEFAULT_MAX_OUTPUT_TOKENS)
        );
        assert_eq!(b.estimate("anthropic", &unbounded).cost_nanos, None);
    }

    #[test]
    fn a_task_cap_refuses_the_call_that_would_pass_it() {
        let estimate = Estimate {
            request_bytes: 300,
            input_tokens: 100,
            output_tokens: 50,
            cost_nanos: Some(1_000),
        };
        let budget = TaskBudget {
            max_tokens: Some(300),
            max_cost_nanos: None,
        };
        let spent = Usage {
            input_tokens: 100,
            output_tokens: 50,
        };
        assert!(
            check_task(&budget, &spent, Some(0), &estimate).is_ok(),
            "150 + 150 = 300 fits"
        );
        let more = Usage {
            input_tokens: 101,
            output_tokens: 50,
        };
        let refusal = check_task(&budget, &more, Some(0), &estimate).unwrap_err();
        assert!(
            refusal
                .message
                .contains("149 of its 300 tokens left (151 used)"),
            "{}",
            refusal.message
        );
        assert!(
            refusal.message.contains("budget.max_tokens"),
            "{}",
            refusal.message
        );

        let cost = TaskBudget {
            max_tokens: None,
            max_cost_nanos: Some(1_500),
        };
        assert!(check_task(&cost, &spent, Some(500), &estimate).is_ok());
        let refusal = check_task(&cost, &spent, Some(501), &estimate).unwrap_err();
        assert!(
            refusal.message.contains("budget.max_cost_usd"),
            "{}",
            refusal.message
        );
        let unpriced = Estimate {
            cost_nanos: None,
            ..estimate
        };
        let refusal = check_task(&cost, &spent, Some(0), &unpriced).unwrap_err();
        assert!(refusal.message.contains("no price"), "{}", refusal.message);
    }

    #[test]
    fn reservations_keep_concurrent_calls_from_sharing_one_remainder() {
        let b = budgets(
            r#"
            [budgets.default]
            period = "day"
            max_tokens = 1000
            "#,
        );
        let cap = b.tenant_cap("acme").unwrap();
        let period = Period::Day.at(1_764_676_800_000);
        let estimate = Estimate {
            request_bytes: 0,
            input_tokens: 200,
            output_tokens: 200,
            cost_nanos: Some(0),
        };
        let used = PeriodUsage::default();
        // Two calls read the same usage (nothing spent); only two 400-token
        // calls fit in 1000, so the third, reading the same, is refused.
        let mark = b.mark("acme", &period.key);
        let first = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap();
        let mut second = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap();
        let third = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap_err();
        assert!(
            third
                .message
                .contains("200 of its 1000 tokens left (0 used, 800 held"),
            "{}",
            third.message
        );
        assert_eq!(b.reserved("acme", &period.key), (800, 0));
        assert!(
            b.reserve_for_tenant("globex", &cap, &period, mark, used, &estimate)
                .is_ok(),
            "another tenant's budget is its own"
        );

        // The second call used 100 tokens and is journaled: its hold goes,
        // its usage counts. A check whose read came before the journal
        // entry (usage still 0) counts it from the release.
        second.settle(100, 0);
        drop(second);
        assert_eq!(b.reserved("acme", &period.key), (400, 0));
        let stale_read = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap();
        // 0 read + 100 settled since the mark + 400 + 400 held = 900; and
        // one more 400 does not fit.
        let refused = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap_err();
        assert!(
            refused.message.contains("(100 used, 800 held"),
            "{}",
            refused.message
        );
        drop(first);
        drop(stale_read);
        assert_eq!(b.reserved("acme", &period.key), (0, 0));
        // A fresh mark after the releases, and a read that sees the 100.
        let mark = b.mark("acme", &period.key);
        let fresh = PeriodUsage {
            input_tokens: 60,
            output_tokens: 40,
            cost_nanos: Some(0),
        };
        let big = Estimate {
            input_tokens: 500,
            output_tokens: 400,
            ..estimate
        };
        assert!(
            b.reserve_for_tenant("acme", &cap, &period, mark, fresh, &big)
                .is_ok()
        );
    }

    #[test]
    fn a_recent_read_is_reused_and_counts_what_settled_since() {
        let b = budgets(
            r#"
            [budgets.default]
            period = "day"
            max_tokens = 1000
            "#,
        );
        let cap = b.tenant_cap("acme").unwrap();
        let period = Period::Day.at(1_764_676_800_000);
        let estimate = Estimate {
            request_bytes: 0,
            input_tokens: 100,
            output_tokens: 200,
            cost_nanos: Some(0),
        };
        assert!(
            b.recent_read("acme", &period.key).is_none(),
            "nothing read yet"
        );
        let mark = b.mark("acme", &period.key);
        let read = PeriodUsage {
            input_tokens: 300,
            output_tokens: 100,
            cost_nanos: Some(0),
        };
        b.note_read("acme", &period.key, mark, read);
        assert!(b.recent_read("globex", &period.key).is_none(), "per tenant");

        // A call held and settled after the read: the reused read counts it
        // through its mark, as a new read of the store would.
        let (mark, used) = b.recent_read("acme", &period.key).expect("a fresh read");
        assert_eq!(used, read);
        let mut call = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap();
        call.settle(300, 0);
        drop(call);
        let (mark, used) = b.recent_read("acme", &period.key).unwrap();
        // 400 read + 300 settled since + 300 asked = 1000 fits; with
        // another 300 held it would not.
        let last = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap();
        let refused = b
            .reserve_for_tenant("acme", &cap, &period, mark, used, &estimate)
            .unwrap_err();
        assert!(
            refused.message.contains("(700 used, 300 held"),
            "{}",
            refused.message
        );
        drop(last);

        std::thread::sleep(STORE_READ_MAX_AGE);
        assert!(
            b.recent_read("acme", &period.key).is_none(),
            "an old read is read again"
        );
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-12-31T23:59:59.999Z
        let at = 1_798_761_599_999;
        let day = Period::Day.at(at);
        assert_eq!(day.key, "day:2026-12-31");
        assert_eq!(day.end, at + 1);
        let month = Period::Month.at(at);
        assert_eq!(month.key, "month:2026-12");
        assert_eq!(
            crate::rfc3339::format(month.start),
            "2026-12-01T00:00:00.000Z"
        );
        assert_eq!(
            crate::rfc3339::format(month.end),
            "2027-01-01T00:00:00.000Z"
        );
        let leap = Period::Month.at(crate::rfc3339::parse("2028-02-29T12:00:00Z").unwrap());
        assert_eq!(leap.key, "month:2028-02");
        assert_eq!(crate::rfc3339::format(leap.end), "2028-03-01T00:00:00.000Z");
    }

    #[test]
    fn a_tenant_override_replaces_the_default_and_an_empty_one_exempts() {
        let b = budgets(
            r#"
            [budgets.default]
            period = "month"
            max_cost_usd = 5
            [budgets.tenants.acme]
            period = "day"
            max_tokens = 10
            [budgets.tenants.free]
            period = "day"
            "#,
        );
        assert_eq!(
            b.tenant_cap("globex"),
            Some(TenantCap {
                period: Period::Month,
                max_tokens: None,
                max_cost_nanos: Some(5_000_000_000)
            })
        );
        assert_eq!(b.tenant_cap("acme").unwrap().max_tokens, Some(10));
        assert_eq!(b.tenant_cap("free"), None);
        assert!(b.any_tenant_cap());
        assert!(!Budgets::default().any_tenant_cap());
    }
}
