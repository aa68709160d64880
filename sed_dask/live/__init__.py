"""Live SED: incremental spectra while a run trains (incremental), the watcher (watch), trainer callbacks."""
