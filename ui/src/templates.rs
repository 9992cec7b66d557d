//! The 📃 template editor an admin opens from a team in the sidebar: add, edit and remove the
//! team's message templates, with the placeholders listed. The core's rule checks the list (in the
//! shell, then the relay); a refusal is shown here, and nothing typed is lost.

use crate::api::call;
use crate::views::{focus, input_value};
use crate::{Action, DeskHandle};
use crewdesk::domain::{MessageTemplate, TEMPLATE_PLACEHOLDERS, TeamId};
use serde::Serialize;
use yew::prelude::*;

#[derive(Properties, PartialEq)]
pub struct EditorProps {
    pub desk: DeskHandle,
    pub team: TeamId,
}

#[derive(Serialize)]
struct TeamArgs<'a> {
    team: &'a TeamId,
}

#[derive(Serialize)]
struct SaveArgs<'a> {
    team: &'a TeamId,
    templates: &'a [MessageTemplate],
}

/// What the editor holds: the templates being edited (none until they are read), why the last
/// save failed, and whether a save is under way.
#[derive(Clone, PartialEq, Default)]
struct Editing {
    templates: Option<Vec<MessageTemplate>>,
    error: Option<String>,
    saving: bool,
}

#[function_component(TemplatesEditor)]
pub fn templates_editor(props: &EditorProps) -> Html {
    let editing = use_state(Editing::default);
    {
        let (editing, team) = (editing.clone(), props.team.clone());
        use_effect_with(team, move |team| {
            let team = team.clone();
            wasm_bindgen_futures::spawn_local(async move {
                match call::<_, Vec<MessageTemplate>>("team_templates", &TeamArgs { team: &team }).await {
                    Ok(t) => editing.set(Editing { templates: Some(t), ..Editing::default() }),
                    Err(e) => editing.set(Editing { templates: Some(Vec::new()), error: Some(e), saving: false }),
                }
                focus("templates-dialog");
            });
            || ()
        });
    }
    let team_name = props
        .desk
        .session
        .teams
        .iter()
        .find(|t| t.id == props.team)
        .map_or_else(|| props.team.as_str().to_owned(), |t| t.name.clone());
    let close = {
        let desk = props.desk.clone();
        Callback::from(move |_: ()| desk.dispatch(Action::EditTemplates(None)))
    };
    // Changes one template (or removes it with `None`), keeping everything else as typed.
    let change = {
        let editing = editing.clone();
        Callback::from(move |(i, t): (usize, Option<MessageTemplate>)| {
            let mut e = (*editing).clone();
            if let Some(list) = e.templates.as_mut() {
                match t {
                    Some(t) if i < list.len() => list[i] = t,
                    Some(t) => list.push(t),
                    None if i < list.len() => drop(list.remove(i)),
                    None => {}
                }
            }
            editing.set(e);
        })
    };
    let save = {
        let (editing, team, close, desk) = (editing.clone(), props.team.clone(), close.clone(), props.desk.clone());
        Callback::from(move |_| {
            let Some(templates) = editing.templates.clone() else { return };
            editing.set(Editing { saving: true, error: None, templates: Some(templates.clone()) });
            let (editing, team, close, desk) = (editing.clone(), team.clone(), close.clone(), desk.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match call::<_, Vec<MessageTemplate>>(
                    "save_templates",
                    &SaveArgs { team: &team, templates: &templates },
                )
                .await
                {
                    Ok(_) => {
                        close.emit(());
                        desk.dispatch(Action::Changed(Vec::new()));
                    }
                    Err(e) => editing.set(Editing { saving: false, error: Some(e), templates: Some(templates) }),
                }
            });
        })
    };
    let onkeydown = {
        let close = close.clone();
        Callback::from(move |e: KeyboardEvent| {
            if e.key() == "Escape" {
                e.prevent_default();
                close.emit(());
            }
        })
    };
    let rows = match &editing.templates {
        None => html! { <p class="muted">{ "Reading the templates…" }</p> },
        Some(list) if list.is_empty() => html! { <p class="muted" id="templates-empty">{ "No templates yet." }</p> },
        Some(list) => html! {
            { for list.iter().enumerate().map(|(i, t)| {
                let (on_name, on_text, on_remove) = (change.clone(), change.clone(), change.clone());
                let (name_t, text_t) = (t.clone(), t.clone());
                html! {
                    <div class="template-edit">
                        <input id={format!("template-name-{i}")} aria-label="Template name" placeholder="Name"
                            value={t.name.clone()}
                            oninput={Callback::from(move |e: InputEvent| on_name.emit((i, Some(MessageTemplate { name: input_value(&e), ..name_t.clone() }))))} />
                        <textarea id={format!("template-text-{i}")} aria-label="Template text" rows="3"
                            value={t.text.clone()}
                            oninput={Callback::from(move |e: InputEvent| on_text.emit((i, Some(MessageTemplate { text: input_value(&e), ..text_t.clone() }))))} />
                        <button class="link" id={format!("template-remove-{i}")}
                            onclick={Callback::from(move |_| on_remove.emit((i, None)))}>{ "Remove" }</button>
                    </div>
                }
            }) }
        },
    };
    let add = {
        let change = change.clone();
        let n = editing.templates.as_ref().map_or(0, Vec::len);
        Callback::from(move |_| {
            change.emit((n, Some(MessageTemplate { name: String::new(), text: String::new() })));
            let id = format!("template-name-{n}");
            wasm_bindgen_futures::spawn_local(async move {
                gloo_timers::future::TimeoutFuture::new(0).await;
                focus(&id);
            });
        })
    };
    let cancel = close.clone();
    html! {
        <div class="overlay">
            <div class="dialog" id="templates-dialog" role="dialog" aria-modal="true" aria-labelledby="templates-title" tabindex="-1" {onkeydown}>
                <h2 id="templates-title">{ format!("📃 Templates · {team_name}") }</h2>
                <p class="small muted">{ format!(
                    "Agents pick a template in the composer and edit it before sending. Placeholders: {} (the customer's name, email and phone), {} (the agent's name).",
                    TEMPLATE_PLACEHOLDERS[..3].join(" "), TEMPLATE_PLACEHOLDERS[3]
                ) }</p>
                <div class="template-list">{ rows }</div>
                <button class="secondary" id="template-add" onclick={add} disabled={editing.templates.is_none()}>{ "+ Add a template" }</button>
                { for editing.error.iter().map(|e| html! { <p class="error" role="alert" id="templates-error">{ e.clone() }</p> }) }
                <div class="dialog-actions">
                    <button class="secondary" id="templates-cancel" onclick={Callback::from(move |_| cancel.emit(()))}>{ "Cancel" }</button>
                    <button class="primary" id="templates-save" onclick={save} disabled={editing.saving || editing.templates.is_none()}>
                        { if editing.saving { "Saving…" } else { "Save" } }</button>
                </div>
            </div>
        </div>
    }
}
