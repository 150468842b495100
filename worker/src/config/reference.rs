//! `docs/configuration.md`: every configuration key with its type, default and description,
//! rendered from the settings' JSON schema (the one `schemas/clipqc-config.schema.json`
//! holds), so the reference cannot drift from the code: a test compares the file with this.

use serde_json::{Map, Value};

const INTRO: &str = "# Configuration reference

Generated from `schemas/clipqc-config.schema.json` (itself generated from the code) by
`CLIPQC_UPDATE_SCHEMAS=1 cargo test --lib config`; a test fails when this file is stale. Do not
edit it by hand: edit the doc comments in `worker/src/config.rs` and the modules it names.

The worker reads a TOML, YAML or JSON file (`--config`, or `CLIPQC_CONFIG`), then environment
variables: prefix `CLIPQC`, separator `__`, e.g. `CLIPQC__MODEL__DEVICE=cuda:1`; lists
comma-separated (`CLIPQC__KAFKA__INPUT_TOPICS=a,b`). Unknown keys are refused. In the key
column `<name>` stands for a name of your choice (a map's key) and `[]` for each element of a
list.
";

/// The Markdown reference of `schema` (the settings' JSON schema).
pub fn markdown(schema: &Value) -> String {
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::from(INTRO);
    let Some(sections) = schema["properties"].as_object() else {
        return out;
    };
    for (name, section) in sections {
        out.push_str(&format!("\n## `{name}`\n\n"));
        let resolved = resolve(section, &defs);
        if let Some(d) = description(section).or_else(|| description(resolved)) {
            out.push_str(&format!("{d}\n\n"));
        }
        out.push_str("| Key | Type | Default | Description |\n|---|---|---|---|\n");
        let mut rows = Vec::new();
        rows_of(name, section, &defs, &mut rows, 0);
        for row in rows {
            out.push_str(&row);
        }
    }
    out
}

/// `v`, with a `$ref` (alone or as the non-null arm of an `anyOf`) resolved.
fn resolve<'a>(v: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    if let Some(r) = v["$ref"].as_str() {
        let name = r.trim_start_matches("#/$defs/");
        return defs.get(name).unwrap_or(v);
    }
    if let Some(arms) = v["anyOf"].as_array() {
        if let Some(arm) = arms.iter().find(|a| a["type"] != "null") {
            return resolve(arm, defs);
        }
    }
    v
}

fn description(v: &Value) -> Option<String> {
    let d = v["description"].as_str()?;
    // One paragraph per cell: the doc comments wrap at 100 columns.
    Some(d.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn optional(v: &Value) -> bool {
    v["type"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "null"))
        || v["anyOf"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["type"] == "null"))
}

/// The type of `v` in words.
fn type_name(v: &Value, defs: &Map<String, Value>) -> String {
    let r = resolve(v, defs);
    let base = if let Some(values) = r["enum"].as_array() {
        values
            .iter()
            .map(|e| format!("`{}`", e.as_str().map_or(e.to_string(), str::to_string)))
            .collect::<Vec<_>>()
            .join(" \\| ")
    } else if let Some(arms) = r["oneOf"].as_array() {
        arms.iter()
            .map(|a| match (&a["const"], a["enum"].as_array()) {
                (Value::String(c), _) => format!("`{c}`"),
                (_, Some(e)) => e
                    .iter()
                    .map(|e| format!("`{}`", e.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(" \\| "),
                _ => type_name(a, defs),
            })
            .collect::<Vec<_>>()
            .join(" \\| ")
    } else if r["properties"].is_object() {
        "table".into()
    } else {
        let types: Vec<&str> = match &r["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let t = types.into_iter().find(|t| *t != "null").unwrap_or("any");
        match t {
            "array" => format!("list of {}", type_name(&r["items"], defs)),
            "object" => match &r["additionalProperties"] {
                Value::Object(_) => {
                    format!("map of {}", type_name(&r["additionalProperties"], defs))
                }
                _ => "table".into(),
            },
            other => other.to_string(),
        }
    };
    if optional(v) || optional(r) {
        format!("{base} (optional)")
    } else {
        base
    }
}

fn default_of(v: &Value) -> String {
    match v.get("default") {
        None => String::new(),
        Some(Value::Null) => "unset".into(),
        Some(d) => {
            let text = d.to_string();
            let text = if text.chars().count() > 60 {
                format!("{}…", text.chars().take(60).collect::<String>())
            } else {
                text
            };
            format!("`{}`", text.replace('|', "\\|"))
        }
    }
}

/// Rows for key `key` of schema `v`: the key itself, then its fields when it is a table (or a
/// list or map of tables).
fn rows_of(key: &str, v: &Value, defs: &Map<String, Value>, rows: &mut Vec<String>, depth: usize) {
    let r = resolve(v, defs);
    if depth > 0 {
        let d = description(v)
            .or_else(|| description(r))
            .unwrap_or_default()
            .replace('|', "\\|");
        rows.push(format!(
            "| `{key}` | {} | {} | {d} |\n",
            type_name(v, defs),
            default_of(v)
        ));
    }
    if depth > 6 {
        return;
    }
    // The table whose fields follow, and the key prefix they get.
    let (table, prefix) = if r["properties"].is_object() {
        (r, key.to_string())
    } else if r["type"] == "array" && resolve(&r["items"], defs)["properties"].is_object() {
        (resolve(&r["items"], defs), format!("{key}[]"))
    } else if resolve(&r["additionalProperties"], defs)["properties"].is_object() {
        (
            resolve(&r["additionalProperties"], defs),
            format!("{key}.<name>"),
        )
    } else {
        return;
    };
    if let Some(fields) = table["properties"].as_object() {
        for (name, field) in fields {
            rows_of(&format!("{prefix}.{name}"), field, defs, rows, depth + 1);
        }
    }
}
