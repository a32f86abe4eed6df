"""The kiosk core without UI: config, composition root, outbox, MQTT sync, health.

Entry points: `terminal.config.load_terminal_config`, `terminal.runtime.build_runtime` / `run_terminal`, and
`TerminalRuntime.record_audit` for the flows that put records into the outbox. This package never imports `ui`,
`sync_server` or `hardware_sim`; the composition root is handed its peripherals.
"""
