"""The Flower ServerApp: read the run's settings and start the run it asks for.

Settings come from the run config (``pyproject.toml`` ``[tool.flwr.app.config]``, overridable
with ``flwr run . <federation> --run-config "num-server-rounds=5 resume=true"``), or are passed
directly by the simulation runner through ``build_server_app(settings)``. The federation is
``server.federation``, the statistics run ``server.stats_run``.
"""

from __future__ import annotations

from .settings import ServerSettings, settings_from_run_config


def build_server_app(settings: ServerSettings | None = None):
    """A ServerApp; without ``settings`` they are read from the run config."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        s = settings or settings_from_run_config(dict(context.run_config))
        if s.mode == "stats":
            from .stats_run import run_stats

            run_stats(grid, s)
        else:
            from .federation import run_federation

            # Flower's run ID names the run's folder (<state_dir>/runs/<run_id>/).
            run_federation(grid, s, run_id=context.run_id)

    return app


app = build_server_app()
