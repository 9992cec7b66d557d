//! The Crewdesk desktop shell: opens the agent's replica in the app data directory, runs the sync
//! driver, exposes thin commands to the yew UI and pushes change events to it. The same library is
//! the mobile entry point; desktop-only code stays behind `cfg(desktop)`.

mod commands;
mod desk;
mod error;
mod notify;
mod settings;

use desk::{AppState, Settings};
use tauri::Manager;

#[cfg_attr(mobile, tauri::mobile_entry_point)]
pub fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .try_init()
        .ok();
    let result = tauri::Builder::default()
        .plugin(tauri_plugin_notification::init())
        .manage(AppState::default())
        .setup(|app| {
            let handle = app.handle().clone();
            app.state::<AppState>().opening.store(true, std::sync::atomic::Ordering::SeqCst);
            tauri::async_runtime::spawn(async move {
                restore(&handle).await;
                // Opened or not, the window asks again who is signed in.
                handle.state::<AppState>().opening.store(false, std::sync::atomic::Ordering::SeqCst);
                desk::emit_changed(&handle, Vec::new());
            });
            #[cfg(desktop)]
            if let Some(window) = app.get_webview_window("main") {
                let _ = window.set_title("Crewdesk");
            }
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            commands::session,
            commands::sign_in,
            commands::sign_out,
            commands::list,
            commands::notifications,
            commands::conversation,
            commands::join,
            commands::grab,
            commands::leave,
            commands::transfer,
            commands::close,
            commands::send,
            commands::send_whatsapp_template,
            commands::send_conference,
            commands::attach,
            commands::attachment_preview,
            commands::save_attachment,
            commands::edit_customer,
            commands::sync_status,
            commands::dismiss_undelivered,
            commands::typing,
            commands::team_templates,
            commands::save_templates,
        ])
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("Crewdesk could not start: {e}");
        std::process::exit(1);
    }
}

/// Opens the desk without asking when possible: from `CREWDESK_RELAY_URL` + `CREWDESK_TOKEN`
/// (the run command and the E2E tests), else from the settings of an earlier sign-in (works
/// offline). Otherwise the window shows the sign-in form.
async fn restore(app: &tauri::AppHandle) {
    let env = match (std::env::var("CREWDESK_RELAY_URL"), std::env::var("CREWDESK_TOKEN")) {
        (Ok(url), Ok(token)) => Some((url, token)),
        _ => None,
    };
    let saved = desk::load_settings(app);
    // The relay and token of the last sign-in: the desk opens at once from the replica, without
    // waiting for the relay to answer first (it may be far, or unreachable).
    let same = |s: &Settings, (url, token): &(String, String)| {
        s.relay_url == url.trim().trim_end_matches('/') && s.token == token.trim()
    };
    let (settings, remember) = match (env, saved) {
        (Some(env), Some(saved)) if same(&saved, &env) => (saved, false),
        (Some((url, token)), saved) => match desk::who_am_i(&url, &token).await {
            Ok((agent, agent_name)) => (Settings::new(&url, &token, agent, agent_name), true),
            Err(e) => {
                tracing::warn!(%e, "CREWDESK_RELAY_URL/CREWDESK_TOKEN rejected; falling back to saved settings");
                let Some(saved) = saved else { return };
                (saved, false)
            }
        },
        (None, Some(saved)) => (saved, false),
        (None, None) => return,
    };
    match desk::open(app, settings, remember) {
        Ok(opened) => {
            let state = app.state::<AppState>();
            *state.desk.lock().await = Some(opened);
        }
        Err(e) => tracing::error!(%e, "cannot open the replica"),
    }
}
