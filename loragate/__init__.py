"""loragate: one OpenAI-compatible endpoint that pins, picks or averages LoRA adapters over vLLM workers.

The distribution maps the top-level folders ``server/``, ``router/``, ``adapters/``, ``workers/`` and
``loadtest/`` into this namespace (``loragate.server`` ...), so nothing installs a bare ``adapters``
package. This root package only holds what every layer shares: the exception tree.
"""

__version__ = "0.1.0"
