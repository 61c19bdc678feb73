//! What people see rows by: each synced table's label column and column formats (config
//! `[[tables]]` `label_column` and `formats`), checked against the catalog at start-up, and the
//! SQL that reads a conflict's row label. Presentation only: no value is ever changed by it.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgPool;

use super::catalog::Catalog;
use crate::config::{ColumnFormat, TableConfig};
use crate::error::{Error, Result};

/// One table's label column and formats.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TablePresentation {
    pub label_column: Option<String>,
    pub formats: BTreeMap<String, ColumnFormat>,
}

/// Every configured table's presentation, by its catalog name.
#[derive(Debug, Default)]
pub struct Presentation {
    tables: BTreeMap<String, TablePresentation>,
}

impl Presentation {
    /// The configured presentations, each column checked to be one of its table's: a typo is a
    /// start-up error that names it, not a label that never shows.
    pub async fn resolve(pool: &PgPool, catalog: &Catalog, configs: &[TableConfig]) -> Result<Presentation> {
        let mut tables = BTreeMap::new();
        for config in configs.iter().filter(|t| t.label_column.is_some() || !t.formats.is_empty()) {
            // The catalog names tables as `regclass::text` does (`products`, not `public.products`).
            let name: Option<String> = sqlx::query_scalar("select to_regclass($1)::text").bind(&config.name).fetch_one(pool).await?;
            let schema = name
                .as_deref()
                .and_then(|n| catalog.get(n))
                .ok_or_else(|| Error::Config(format!("tables `{}`: not a synced table, so its label_column and formats cannot apply", config.name)))?;
            for column in config.label_column.iter().chain(config.formats.keys()) {
                if !schema.columns.contains_key(column) {
                    return Err(Error::Config(format!("tables `{}`: `{column}` (label_column or formats) is not one of its columns", config.name)));
                }
            }
            let presentation = TablePresentation { label_column: config.label_column.clone(), formats: config.formats.clone() };
            tables.insert(schema.name.clone(), presentation);
        }
        Ok(Presentation { tables })
    }

    pub fn get(&self, table: &str) -> Option<&TablePresentation> {
        self.tables.get(table)
    }

    /// `$1` tenant: an expression for the row label of conflict `c` (a row of
    /// `synchub.conflicts`), or null text when its table has no label column.
    pub fn conflict_label_sql(&self, catalog: &Catalog) -> String {
        let branches: Vec<String> = self
            .tables
            .iter()
            .filter_map(|(table, p)| Some((catalog.get(table)?, p.label_column.as_deref()?)))
            .map(|(schema, label)| format!("when '{}' then {}", schema.name.replace('\'', "''"), schema.label_sql(label, "c.pk")))
            .collect();
        if branches.is_empty() {
            "null::text".into()
        } else {
            format!("(case c.table_name {} end)", branches.join(" "))
        }
    }
}
