//! The campaign's answers against its cases: one verdict per request (matched by source
//! coordinates, the request id echoed), the verdict one the case allows, a dead letter for
//! each ERROR verdict and none for the others, no secret repeated; and the table by kind.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::cases::{Case, Kind, PUBLISH};
use super::kafka::Rec;

#[derive(Default)]
struct Row {
    cases: usize,
    answered: usize,
    decided: usize,
    codes: BTreeMap<String, usize>,
    dead: usize,
    violations: usize,
}

pub struct Report {
    /// Requests with at least one verdict.
    pub answered: usize,
    /// Verdicts beyond the first for a request.
    pub duplicates: usize,
    /// ERROR verdicts (each needs its dead letter).
    pub errors: usize,
    pub dead_letters: usize,
    pub dead_duplicates: usize,
    /// What is wrong, one line each (case kind and description included).
    pub violations: Vec<String>,
    rows: BTreeMap<Kind, Row>,
}

/// `landed[i]` is where case `i` was published.
pub fn check(cases: &[Case], landed: &[(i32, i64)], verdicts: &[Rec], dead: &[Rec]) -> Report {
    let index: HashMap<(i32, i64), usize> =
        landed.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let mut rows: BTreeMap<Kind, Row> = BTreeMap::new();
    for c in cases {
        rows.entry(c.kind).or_default().cases += 1;
    }
    let mut violations = Vec::new();
    let mut first: HashMap<usize, bool> = HashMap::new();
    let mut duplicates = 0;
    for v in verdicts {
        let Some(i) = v.source().and_then(|s| index.get(&s).copied()) else {
            violations.push(format!(
                "a verdict for no published request: {:?}",
                v.source()
            ));
            continue;
        };
        let c = &cases[i];
        let say = |m: String| format!("{:?} {} ({}): {m}", c.kind, c.what, i);
        let json: serde_json::Value = match serde_json::from_slice(&v.payload) {
            Ok(j) => j,
            Err(e) => {
                violations.push(say(format!("verdict is not JSON: {e}")));
                continue;
            }
        };
        let error = json["outcome"] == "OUTCOME_ERROR";
        let code = json["error"]["code"].as_str().unwrap_or("").to_string();
        if first.insert(i, error).is_some() {
            duplicates += 1;
            continue;
        }
        let row = rows.get_mut(&c.kind).unwrap();
        row.answered += 1;
        let message = json["error"]["message"].as_str().unwrap_or("");
        if error {
            *row.codes.entry(short(&code)).or_default() += 1;
            if !c.expect.codes.contains(&code.as_str()) {
                let shown: String = message.chars().take(300).collect();
                let expected = c.expect.codes;
                violations.push(say(format!(
                    "{code} ({shown}), expected one of {expected:?}"
                )));
                row.violations += 1;
            }
        } else {
            row.decided += 1;
            if !c.expect.pass {
                let outcome = &json["outcome"];
                violations.push(say(format!("{outcome}, expected {:?}", c.expect.codes)));
                row.violations += 1;
            }
        }
        if let Some(id) = &c.request_id {
            let echoed = json["requestId"].as_str().unwrap_or("");
            // A verdict shrunk to fit the broker carries the id's first bytes; an id over
            // the 256-byte limit is echoed cut, ending in "…".
            let cut = echoed
                .strip_suffix('…')
                .is_some_and(|p| id.len() > 256 && id.starts_with(p));
            let ok = echoed == id || (code == PUBLISH && id.starts_with(echoed)) || cut;
            if !ok {
                let shown: String = echoed.chars().take(60).collect();
                violations.push(say(format!("verdict answers request {shown:?}")));
                row.violations += 1;
            }
        }
        let text = String::from_utf8_lossy(&v.payload);
        for s in c.secrets.iter().filter(|s| text.contains(*s)) {
            violations.push(say(format!("the verdict repeats {s:?}: {message}")));
            row.violations += 1;
        }
    }
    let missing: Vec<usize> = (0..cases.len())
        .filter(|i| !first.contains_key(i))
        .collect();
    for &i in &missing {
        let c = &cases[i];
        violations.push(format!("{:?} {} ({i}): no verdict", c.kind, c.what));
    }
    let mut seen_dead: HashMap<usize, usize> = HashMap::new();
    for d in dead {
        let Some(i) = d.source().and_then(|s| index.get(&s).copied()) else {
            violations.push(format!(
                "a dead letter for no published request: {:?}",
                d.source()
            ));
            continue;
        };
        *seen_dead.entry(i).or_default() += 1;
        let c = &cases[i];
        for (name, value) in d.headers.iter().filter(|(k, _)| k.starts_with("__connect")) {
            let value = String::from_utf8_lossy(value);
            for s in c.secrets.iter().filter(|s| value.contains(*s)) {
                violations.push(format!(
                    "{:?} {}: dead letter header {name} repeats {s:?}",
                    c.kind, c.what
                ));
            }
        }
    }
    for (&i, &error) in &first {
        let c = &cases[i];
        let n = seen_dead.get(&i).copied().unwrap_or(0);
        rows.get_mut(&c.kind).unwrap().dead += n.min(1);
        if error && n == 0 {
            violations.push(format!(
                "{:?} {} ({i}): ERROR verdict without a dead letter",
                c.kind, c.what
            ));
        }
        if !error && n > 0 {
            violations.push(format!(
                "{:?} {} ({i}): a dead letter for a decided request",
                c.kind, c.what
            ));
        }
    }
    Report {
        answered: first.len(),
        duplicates,
        errors: first.values().filter(|e| **e).count(),
        dead_letters: dead.len(),
        dead_duplicates: seen_dead.values().map(|n| n - 1).sum(),
        violations,
        rows,
    }
}

fn short(code: &str) -> String {
    code.trim_start_matches("ERROR_CODE_").to_ascii_lowercase()
}

impl Report {
    /// One line per kind: cases, answered, decided verdicts, ERROR verdicts by code, dead
    /// letters, violations; and the totals.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<13} {:>6} {:>8} {:>7} {:>5} {:>4}  error codes\n",
            "kind", "inputs", "answered", "decided", "dead", "bad"
        );
        let mut total = Row::default();
        for (kind, r) in &self.rows {
            let codes: Vec<String> = r.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let _ = writeln!(
                s,
                "{:<13} {:>6} {:>8} {:>7} {:>5} {:>4}  {}",
                kind.to_string(),
                r.cases,
                r.answered,
                r.decided,
                r.dead,
                r.violations,
                codes.join(", ")
            );
            total.cases += r.cases;
            total.answered += r.answered;
            total.decided += r.decided;
            total.dead += r.dead;
            total.violations += r.violations;
        }
        let _ = writeln!(
            s,
            "{:<13} {:>6} {:>8} {:>7} {:>5} {:>4}",
            "all", total.cases, total.answered, total.decided, total.dead, total.violations
        );
        s
    }
}
