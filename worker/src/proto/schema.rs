//! JSON Schemas of the contracts' JSON forms, derived from the compiled `.proto` files so they
//! cannot drift from them. Checked in as `schemas/clipqc.v1.*.schema.json` (a test keeps
//! them current) for camera gateways and data people that speak JSON.
//!
//! The proto3 JSON mapping, as the worker's parser (pbjson) applies it: every field may be
//! written with its proto name or its lowerCamelCase JSON name; 64-bit integers may be numbers
//! or strings; enums are their value names or numbers; bytes are base64; Timestamp is an RFC
//! 3339 string and Duration a decimal number of seconds with an `s`; `null` leaves a message
//! field unset.

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde_json::{json, Map, Value};

/// The JSON Schema (2020-12) of message `full_name` (e.g. `clipqc.v1.Verdict`).
pub fn json_schema(full_name: &str) -> Value {
    let set = FileDescriptorSet::decode(super::DESCRIPTOR)
        .expect("the build script wrote a valid descriptor set. This is a bug.");
    let messages = all_messages(&set);
    let mut defs = Map::new();
    let mut pending = vec![full_name.to_string()];
    while let Some(name) = pending.pop() {
        if defs.contains_key(&name) {
            continue;
        }
        let message = messages
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
            .unwrap_or_else(|| panic!("message {name} is not in the descriptor set"));
        defs.insert(name.clone(), message_schema(message, &set, &mut pending));
    }
    let root = defs.remove(full_name).expect("inserted above");
    let mut schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("urn:clipqc:schema:{full_name}"),
        "title": full_name,
        "description": format!("{full_name} in the proto3 JSON mapping (proto/clipqc/v1/inspection.proto)."),
    });
    let obj = schema.as_object_mut().expect("a literal object");
    obj.extend(
        root.as_object()
            .expect("message schemas are objects")
            .clone(),
    );
    if !defs.is_empty() {
        obj.insert("$defs".into(), Value::Object(defs));
    }
    schema
}

/// Every message of the set with its full name, nested ones included (map entries too).
fn all_messages(set: &FileDescriptorSet) -> Vec<(String, &DescriptorProto)> {
    fn walk<'a>(
        prefix: &str,
        m: &'a DescriptorProto,
        out: &mut Vec<(String, &'a DescriptorProto)>,
    ) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk(&name, nested, out);
        }
        out.push((name, m));
    }
    let mut out = Vec::new();
    for file in &set.file {
        for m in &file.message_type {
            walk(file.package(), m, &mut out);
        }
    }
    out
}

fn enum_values(set: &FileDescriptorSet, full_name: &str) -> Vec<String> {
    for file in &set.file {
        for e in &file.enum_type {
            if format!("{}.{}", file.package(), e.name()) == full_name {
                return e.value.iter().map(|v| v.name().to_string()).collect();
            }
        }
    }
    panic!("enum {full_name} is not in the descriptor set")
}

fn message_schema(
    m: &DescriptorProto,
    set: &FileDescriptorSet,
    pending: &mut Vec<String>,
) -> Value {
    let mut properties = Map::new();
    let mut oneofs: Vec<Vec<String>> = vec![Vec::new(); m.oneof_decl.len()];
    for field in &m.field {
        let schema = field_schema(field, m, set, pending);
        let mut names = vec![field.name().to_string()];
        if field.json_name() != field.name() {
            names.push(field.json_name().to_string());
        }
        // Synthetic oneofs of proto3 `optional` fields are no choice between fields.
        if let (Some(i), false) = (field.oneof_index, field.proto3_optional()) {
            oneofs[i as usize].extend(names.iter().cloned());
        }
        for n in names {
            properties.insert(n, schema.clone());
        }
    }
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    // At most one member of each oneof (in either spelling).
    let exclusive: Vec<Value> = oneofs
        .iter()
        .filter(|names| names.len() > 1)
        .flat_map(|names| {
            let mut pairs = Vec::new();
            for (i, a) in names.iter().enumerate() {
                for b in &names[i + 1..] {
                    pairs.push(json!({"not": {"required": [a, b]}}));
                }
            }
            pairs
        })
        .collect();
    if !exclusive.is_empty() {
        schema["allOf"] = Value::Array(exclusive);
    }
    schema
}

fn field_schema(
    field: &prost_types::FieldDescriptorProto,
    parent: &DescriptorProto,
    set: &FileDescriptorSet,
    pending: &mut Vec<String>,
) -> Value {
    let type_name = field.type_name().trim_start_matches('.');
    let single = match field.r#type() {
        Type::String => json!({"type": "string"}),
        Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 | Type::Uint32 | Type::Fixed32 => {
            json!({"type": "integer"})
        }
        Type::Int64 | Type::Sint64 | Type::Sfixed64 | Type::Uint64 | Type::Fixed64 => {
            json!({"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]})
        }
        Type::Float | Type::Double => json!({"anyOf": [
            {"type": "number"},
            {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
        ]}),
        Type::Enum => json!({"anyOf": [
            {"type": "string", "enum": enum_values(set, type_name)},
            {"type": "integer"}
        ]}),
        Type::Message | Type::Group => match type_name {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => {
                json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"})
            }
            _ => {
                // A map field is a repeated nested `…Entry` message with key and value.
                let entry = parent
                    .nested_type
                    .iter()
                    .find(|n| type_name.ends_with(&format!(".{}", n.name())))
                    .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()));
                if let Some(entry) = entry {
                    let value = entry
                        .field
                        .iter()
                        .find(|f| f.name() == "value")
                        .expect("map entries have a value. This is a bug.");
                    let value = field_schema(value, entry, set, pending);
                    return json!({"type": "object", "additionalProperties": value});
                }
                pending.push(type_name.to_string());
                json!({"$ref": format!("#/$defs/{type_name}")})
            }
        },
    };
    if field.label() == Label::Repeated {
        return json!({"type": "array", "items": single});
    }
    if field.r#type() == Type::Message {
        // `null` leaves a message field unset (the parser refuses it for scalars).
        return json!({"anyOf": [single, {"type": "null"}]});
    }
    single
}

#[cfg(test)]
mod tests;
