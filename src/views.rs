//! Views: the extension point for data engineers.
//!
//! A view is a function from the pipeline's collections ([`ViewInputs`]) to a collection of
//! `(key, value)` rows, at most one value per key at any time (what `count`, `reduce` and
//! joins against them give). The sink stores each view as a table whose columns are the
//! view's key and value columns, upserting absolute values. Views live in `dataflows/`, one
//! file each, and are registered in [`crate::dataflows::VIEWS`]; see `docs/adding-a-view.md`.

use std::net::IpAddr;

use differential_dataflow::VecCollection;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::dataflow::classify::Verdict;
use crate::record::AdRecord;
use crate::time::{Finality, Granularity, Millis, Time};

/// One column value of a view row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Datum {
    /// An unsigned id (ads, campaigns, advertisers).
    Id(u64),
    /// A signed integer (counts, money in micros).
    Int(i64),
    /// Epoch milliseconds.
    Time(Millis),
    /// Text.
    Text(String),
}

impl Datum {
    /// The value as i64, for integer columns (ids are stored bit-cast).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Datum::Id(v) => Some(*v as i64),
            Datum::Int(v) => Some(*v),
            Datum::Time(v) => Some(*v as i64),
            Datum::Text(_) => None,
        }
    }
}

/// A row: key or value columns in declaration order.
pub type Row = Vec<Datum>;

/// The window start in a view's key, at the index [`ViewDef::window_index`] gives (found
/// once per view by whoever reads many rows, not by column name for each).
pub fn window_start(key: &Row, index: usize) -> Option<Millis> {
    match key.get(index) {
        Some(Datum::Time(t)) => Some(*t),
        _ => None,
    }
}

/// The type of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// An unsigned 64-bit id.
    Id,
    /// A signed 64-bit integer.
    Int,
    /// Epoch milliseconds.
    Time,
    /// Text.
    Text,
}

/// A named, typed column.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Column name in the store.
    pub name: &'static str,
    /// Its type.
    pub ty: ColumnType,
}

/// Shorthand for declaring columns.
pub const fn col(name: &'static str, ty: ColumnType) -> Column {
    Column { name, ty }
}

/// The event-time window a row belongs to, which decides when the row becomes final.
#[derive(Clone, Copy, Debug)]
pub struct WindowSpec {
    /// The key column holding the window start (a `Time` column).
    pub column: &'static str,
    /// The window length.
    pub length_ms: u64,
}

/// Additive rollups the sink maintains from a view's committed rows.
///
/// Long windows (a day) cannot be rebuilt from a horizon of log, so they are maintained at
/// commit time from the stored rows, in the same transaction (as Mesa does): a rollup row
/// always equals the sum of the stored rows it covers.
#[derive(Clone, Copy, Debug)]
pub struct RollupSpec {
    /// `(scope name, column holding the scope's id)`: e.g. `("campaign", "campaign_id")`.
    pub scopes: &'static [(&'static str, &'static str)],
    /// The window lengths to roll up to.
    pub granularities: &'static [Granularity],
    /// Integer value columns that are summed.
    pub measures: &'static [&'static str],
    /// `(scope, granularity)` pairs not stored because the view itself holds them.
    pub skip: &'static [(&'static str, Granularity)],
}

/// An id (a user, a click) as a number when its text is a canonical decimal, else as its
/// text: 16 bytes, hashed and compared as one word in the common case, where a `SmolStr`
/// takes 24 and hashes its bytes. For views that keep many ids in a map (distinct users).
/// The mapping is one to one, so ids are equal exactly when their texts are.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CompactId {
    /// A canonical decimal (no sign, no leading zero) that fits in a u64.
    Number(u64),
    /// Any other text.
    Text(Box<str>),
}

impl CompactId {
    /// The compact form of `id`.
    pub fn of(id: &str) -> CompactId {
        match decimal_id(id) {
            Some(n) => CompactId::Number(n),
            None => CompactId::Text(id.into()),
        }
    }
}

/// `id` as a number when it is a canonical decimal that fits in a u64: the text is then
/// exactly `n.to_string()`, so nothing is lost.
pub fn decimal_id(id: &str) -> Option<u64> {
    let b = id.as_bytes();
    let canonical = !b.is_empty()
        && b.len() <= 20
        && b.iter().all(u8::is_ascii_digit)
        && (b[0] != b'0' || b.len() == 1);
    if canonical { id.parse().ok() } else { None }
}

/// How a click was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ClickClass {
    /// Deduplicated, on time, not fraud: billed.
    Billable,
    /// Deduplicated and on time, but flagged by a verdict or a built-in rule.
    Fraud,
    /// No click of its impression arrived within the allowed lateness.
    Late,
}

/// One counted click per impression: the dedup winner and how it counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClassifiedClick {
    /// The impression (dedup key).
    pub impression_id: u128,
    /// The ad.
    pub ad_id: u64,
    /// Event time, clamped into `[record time - TTL, record time]`.
    pub event_time_ms: Millis,
    /// Record time.
    pub record_time_ms: Millis,
    /// The click id.
    pub click_id: SmolStr,
    /// The user.
    pub user_id: SmolStr,
    /// The client IP.
    pub ip: IpAddr,
    /// The price at click time.
    pub cpc_micros: u64,
    /// How it counts.
    pub class: ClickClass,
}

/// What every view may read.
///
/// A view that needs one class reads that class's collection rather than filtering
/// `classified`: every consumer of a collection receives its own copy of each batch.
#[derive(Clone)]
pub struct ViewInputs<'s> {
    /// One click per impression that had any click, classified: `billable`, `fraud` and
    /// `late` together.
    pub classified: VecCollection<'s, Time, ClassifiedClick>,
    /// The classified clicks of class `Billable`.
    pub billable: VecCollection<'s, Time, ClassifiedClick>,
    /// The classified clicks of class `Fraud`.
    pub fraud: VecCollection<'s, Time, ClassifiedClick>,
    /// The classified clicks of class `Late`.
    pub late: VecCollection<'s, Time, ClassifiedClick>,
    /// Per impression with a live verdict, its earliest one, keyed by impression id. A
    /// `Fraud` click was flagged by this verdict, or by the burst rule, or both.
    pub first_verdicts: VecCollection<'s, Time, (u128, Verdict)>,
    /// The impressions whose counted click the IP-burst rule flags, each once.
    pub burst_flagged: VecCollection<'s, Time, u128>,
    /// The catalog: the latest record of every ad, keyed by ad id.
    pub ads: VecCollection<'s, Time, (u64, AdRecord)>,
    /// When windows become final (the sink's rule), for views that ask what a row held
    /// when it froze.
    pub finality: Finality,
    /// Counts the updates that in-place operators (`crate::dataflow::distinct`) hold back
    /// until their time is complete: the gauge `clickagg_pending_updates`.
    pub pending_updates: Gauge,
}

/// A view's output: `(key, value)` rows.
pub type ViewCollection<'s> = VecCollection<'s, Time, (Row, Row)>;

/// A registered view.
#[derive(Clone, Copy)]
pub struct ViewDef {
    /// Name; its table is `v_<name>`.
    pub name: &'static str,
    /// One line on what it holds.
    pub about: &'static str,
    /// Key columns (the table's primary key).
    pub key: &'static [Column],
    /// Value columns.
    pub value: &'static [Column],
    /// The window each row belongs to.
    pub window: WindowSpec,
    /// Rollups the sink maintains from this view, if any.
    pub rollup: Option<RollupSpec>,
    /// Builds the view from the inputs.
    pub build: for<'s> fn(&ViewInputs<'s>) -> ViewCollection<'s>,
}

impl std::fmt::Debug for ViewDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewDef")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ViewDef {
    /// The store table of this view.
    pub fn table(&self) -> String {
        format!("v_{}", self.name)
    }

    /// The store table of this view's rollups.
    pub fn rollup_table(&self) -> String {
        format!("v_{}_rollup", self.name)
    }

    /// Index of the key column holding the window start.
    pub fn window_index(&self) -> Option<usize> {
        self.key.iter().position(|c| c.name == self.window.column)
    }

    /// Where a column is: `(in key?, index)`.
    pub fn column(&self, name: &str) -> Option<(bool, usize)> {
        if let Some(i) = self.key.iter().position(|c| c.name == name) {
            return Some((true, i));
        }
        self.value
            .iter()
            .position(|c| c.name == name)
            .map(|i| (false, i))
    }

    /// Checks the declaration: names exist, types fit. Run by a unit test and at start.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!(
                "view name {name:?} must be lowercase letters, digits and _"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for c in self.key.iter().chain(self.value) {
            if !seen.insert(c.name) {
                return Err(format!("view {name}: column {} declared twice", c.name));
            }
        }
        match self.window_index().map(|i| self.key[i].ty) {
            Some(ColumnType::Time) => {}
            _ => {
                return Err(format!(
                    "view {name}: window column {} must be a Time key column",
                    self.window.column
                ));
            }
        }
        if self.window.length_ms == 0 {
            return Err(format!("view {name}: window length must be positive"));
        }
        if let Some(r) = &self.rollup {
            for (_, c) in r.scopes {
                match self.column(c) {
                    Some((true, i)) if self.key[i].ty == ColumnType::Id => {}
                    Some((false, i)) if self.value[i].ty == ColumnType::Id => {}
                    _ => {
                        return Err(format!(
                            "view {name}: rollup scope column {c} must be an Id column"
                        ));
                    }
                }
            }
            for m in r.measures {
                match self.column(m) {
                    Some((false, i)) if self.value[i].ty == ColumnType::Int => {}
                    _ => {
                        return Err(format!(
                            "view {name}: rollup measure {m} must be an Int value column"
                        ));
                    }
                }
            }
            if r.granularities
                .iter()
                .any(|g| g.ms() < self.window.length_ms || g.ms() % self.window.length_ms != 0)
            {
                return Err(format!(
                    "view {name}: rollup granularities must be multiples of the window"
                ));
            }
        }
        Ok(())
    }
}

/// The registered views.
pub fn registry() -> &'static [ViewDef] {
    crate::dataflows::VIEWS
}

/// Views the query API's metrics read: a deployment cannot switch them off. (The
/// `fraud_adjustments` routes answer `501 view_disabled` when that view is off.)
pub const REQUIRED: &[&str] = &["ad_clicks", "late_clicks"];

/// The registered views minus `disabled`, in registry order; names are checked by the
/// config (see [`check_disabled`]). Switching a view off saves its state; its table stays
/// as it was, and switching it on again on the same store leaves a gap in it.
pub fn enabled(disabled: &[String]) -> &'static [ViewDef] {
    if disabled.is_empty() {
        return registry();
    }
    let views: Vec<ViewDef> = registry()
        .iter()
        .filter(|v| !disabled.iter().any(|d| d == v.name))
        .copied()
        .collect();
    // Once per process: the dataflow, the sink and the store share one view list.
    Box::leak(views.into_boxed_slice())
}

/// Why a list of views to switch off is not acceptable, if it is not.
pub fn check_disabled(disabled: &[String]) -> Result<(), String> {
    for name in disabled {
        if !registry().iter().any(|v| v.name == name) {
            let known: Vec<&str> = registry().iter().map(|v| v.name).collect();
            return Err(format!("no view named {name:?}; the views are {known:?}"));
        }
        if REQUIRED.contains(&name.as_str()) {
            return Err(format!(
                "view {name:?} is read by the query API and cannot be switched off"
            ));
        }
    }
    Ok(())
}

/// The longest window of `views`: the horizon must cover it.
pub fn longest_window_ms(views: &[ViewDef]) -> u64 {
    views.iter().map(|v| v.window.length_ms).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_view_is_well_formed_and_unique() {
        let mut names = std::collections::HashSet::new();
        for v in registry() {
            v.validate().unwrap_or_else(|e| panic!("{e}"));
            assert!(names.insert(v.name), "view {} registered twice", v.name);
        }
    }

    #[test]
    fn a_compact_id_takes_16_bytes_and_only_canonical_decimals_become_numbers() {
        assert_eq!(std::mem::size_of::<CompactId>(), 16);
        assert_eq!(CompactId::of("618009"), CompactId::Number(618_009));
        assert_eq!(CompactId::of("0"), CompactId::Number(0));
        for text in ["007", "", "-1", "+1", "1e3", "u42", "18446744073709551616"] {
            assert_eq!(
                CompactId::of(text),
                CompactId::Text(text.into()),
                "{text:?}"
            );
        }
    }

    proptest::proptest! {
        /// Two ids are equal exactly when their texts are: the oracle is the plain string.
        #[test]
        fn compact_ids_are_equal_exactly_when_their_texts_are(
            a in "(0|[1-9][0-9]{0,20}|0[0-9]{1,3}|[a-z0-9]{1,6})",
            other in "(0|[1-9][0-9]{0,20}|0[0-9]{1,3}|[a-z0-9]{1,6})",
            same in proptest::bool::ANY,
        ) {
            let b = if same { a.clone() } else { other };
            proptest::prop_assert_eq!(CompactId::of(&a) == CompactId::of(&b), a == b);
            proptest::prop_assert_eq!(CompactId::of(&a).cmp(&CompactId::of(&b)).is_eq(), a == b);
        }

        /// A text is a decimal id exactly when it is the decimal form of a u64: the oracle
        /// parses and prints it back.
        #[test]
        fn decimal_ids_are_the_u64s_printed(
            text in "(0|[1-9][0-9]{0,20}|0[0-9]{0,3}|[+-]?[0-9]{1,4}|[0-9a-z ]{0,6}|18446744073709551[0-9]{3})",
        ) {
            let oracle = text.parse::<u64>().ok().filter(|n| n.to_string() == text);
            proptest::prop_assert_eq!(decimal_id(&text), oracle);
        }
    }
}
