"""The demo page: `python -m src.app` serves, on 127.0.0.1, a page that classifies an uploaded dermoscopy image
with the registry's champion (or --model URI): calibrated probabilities, the attention map, the model version."""

from __future__ import annotations

import sys

from src import cli
from src.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Serve a demo page that classifies one uploaded image with the champion model.")
    p.add_argument("--model", help="MLflow model URI (default: models:/<tracking.registered_model>@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    args = p.parse_args(argv)

    def body() -> int:
        from werkzeug.serving import make_server

        from src.demo.loading import ModelSource
        from src.demo.page import create_app
        from src.tracking.runs import tracking_uri

        params = cli.load(args)
        uri = args.model or f"models:/{params.tracking.registered_model}@champion"
        source = ModelSource(uri, tracking_uri(params.tracking))
        try:
            server = make_server(args.host, args.port, create_app(source), threaded=True)
        except SystemExit:  # werkzeug has printed why (a port in use, an unknown address) and exits: add the fix
            raise UserError(f"cannot listen on {args.host}:{args.port}; pass another --port or --host") from None
        print(f"demo page on http://{args.host}:{server.server_port}/ serving {uri} (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("demo page stopped")
        finally:
            server.server_close()
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
