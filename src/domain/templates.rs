//! 📃 Message templates (a team's canned replies, with placeholders) and approved WhatsApp
//! templates: what a list of them must be, and how they are filled.

use super::{Customer, DomainError, MAX_MESSAGE_BYTES, MAX_NAME_BYTES};
use serde::{Deserialize, Serialize};

/// A canned reply; `{name}`, `{email}`, `{phone}` and `{agent}` are filled in when it is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageTemplate {
    pub name: String,
    pub text: String,
}

/// The placeholders a message template may use ([`fill_template`] fills them).
pub const TEMPLATE_PLACEHOLDERS: [&str; 4] = ["{name}", "{email}", "{phone}", "{agent}"];

/// At most this many 📃 templates per team (the composer's menu lists them all).
pub const MAX_TEMPLATES: usize = 200;

/// At most this much text in a team's templates together.
pub const MAX_TEMPLATES_BYTES: usize = 512 * 1024;

/// A team's list of templates as it is kept: names without surrounding spaces, then checked by
/// [`validate_templates`]. The desk, the relay's API and its command all keep lists through this.
pub fn checked_templates(templates: Vec<MessageTemplate>) -> Result<Vec<MessageTemplate>, DomainError> {
    let templates: Vec<MessageTemplate> =
        templates.into_iter().map(|t| MessageTemplate { name: t.name.trim().to_owned(), text: t.text }).collect();
    validate_templates(&templates)?;
    Ok(templates)
}

/// What a team's list of templates must be: each valid, no two with one name, at most
/// [`MAX_TEMPLATES`].
pub fn validate_templates(templates: &[MessageTemplate]) -> Result<(), DomainError> {
    if templates.len() > MAX_TEMPLATES {
        return Err(DomainError::InvalidTemplate(format!("at most {MAX_TEMPLATES} templates per team")));
    }
    if templates.iter().map(|t| t.name.len() + t.text.len()).sum::<usize>() > MAX_TEMPLATES_BYTES {
        return Err(DomainError::InvalidTemplate(format!(
            "a team's templates hold at most {} KiB of text together",
            MAX_TEMPLATES_BYTES / 1024
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for t in templates {
        t.validate()?;
        if !names.insert(t.name.trim()) {
            return Err(DomainError::InvalidTemplate(format!("two templates are named {}", t.name.trim())));
        }
    }
    Ok(())
}

impl MessageTemplate {
    /// What a team's template must be: a name (at most [`MAX_NAME_BYTES`], one line), a text that
    /// is not empty and at most [`MAX_MESSAGE_BYTES`], and no placeholder but
    /// [`TEMPLATE_PLACEHOLDERS`] (a mistyped one would reach the customer as written).
    pub fn validate(&self) -> Result<(), DomainError> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains(['\n', '\r']) {
            return Err(DomainError::InvalidTemplate(format!(
                "a template needs a name of one line, at most {MAX_NAME_BYTES} bytes"
            )));
        }
        if self.text.trim().is_empty() {
            return Err(DomainError::EmptyMessage);
        }
        if self.text.len() > MAX_MESSAGE_BYTES {
            return Err(DomainError::MessageTooLong { max: MAX_MESSAGE_BYTES });
        }
        let mut rest = self.text.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open..];
            let word = after
                .find('}')
                .map(|close| &after[..=close])
                .filter(|w| w.len() > 2 && w[1..w.len() - 1].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if let Some(word) = word {
                if !TEMPLATE_PLACEHOLDERS.contains(&word) {
                    return Err(DomainError::InvalidTemplate(format!(
                        "unknown placeholder {word}: use {}",
                        TEMPLATE_PLACEHOLDERS.join(", ")
                    )));
                }
                rest = &after[word.len()..];
            } else {
                rest = &after[1..];
            }
        }
        Ok(())
    }
}

/// An approved WhatsApp template: the only thing that may be sent outside the 24 h window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhatsAppTemplate {
    pub name: String,
    pub language: String,
    /// Body with numbered parameters `{{1}}`, `{{2}}`, ...
    pub body: String,
}

/// Fills a message template's placeholders from the customer and the agent.
pub fn fill_template(text: &str, customer: &Customer, agent_name: &str) -> String {
    text.replace("{name}", &customer.name)
        .replace("{email}", customer.email.as_deref().unwrap_or(""))
        .replace("{phone}", customer.phone.as_deref().unwrap_or(""))
        .replace("{agent}", agent_name)
}

/// Fills a WhatsApp template's numbered parameters; every parameter must be given.
pub fn fill_whatsapp_template(template: &WhatsAppTemplate, params: &[String]) -> Result<String, DomainError> {
    let mut text = template.body.clone();
    let mut expected = 0;
    while template.body.contains(&format!("{{{{{}}}}}", expected + 1)) {
        expected += 1;
    }
    if params.len() != expected {
        return Err(DomainError::TemplateParams { expected, given: params.len() });
    }
    for (i, p) in params.iter().enumerate() {
        if p.trim().is_empty() {
            return Err(DomainError::TemplateParams { expected, given: i });
        }
        text = text.replace(&format!("{{{{{}}}}}", i + 1), p);
    }
    Ok(text)
}
