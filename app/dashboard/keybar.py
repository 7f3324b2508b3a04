"""The footer: the keys that work now, on one line, redrawn as text.

Textual's Footer is a row of widgets, one per key, rebuilt (composed and laid out, 50-100 ms)
whenever the keys change, e.g. when the filter box takes the focus and the letter keys go to
it. Here the line is one Text: a change of keys repaints one line. A click on a key presses it.
"""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.screen import Screen
from textual.widget import Widget

#: (key as shown, its description, enabled); the key pressed by a click
Key = tuple[str, str, bool, str]


class KeyBar(Widget):
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        width: 1fr;
        color: $footer-foreground;
        background: $footer-background;
        & > .keybar--key {
            color: $footer-key-foreground;
            background: $footer-key-background;
            text-style: bold;
        }
        & > .keybar--description {
            color: $footer-description-foreground;
            background: $footer-description-background;
        }
    }
    """
    COMPONENT_CLASSES = {"keybar--key", "keybar--description"}

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.keys: tuple[Key, ...] = ()
        self._palette: Key | None = None
        self._spans: list[tuple[int, int, str, bool]] = []  # x from, x to, key, enabled

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self._bindings_changed(self.screen)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen[object]) -> None:
        app, palette, keys = self.app, None, []
        seen: set[str] = set()
        for _node, binding, enabled, _tooltip in screen.active_bindings.values():
            if not binding.show or binding.action in seen:
                continue  # one entry per action, as Textual's Footer
            seen.add(binding.action)
            key = (app.get_key_display(binding), binding.description, enabled, binding.key)
            keys.append(key)
        if app.ENABLE_COMMAND_PALETTE:
            found = screen.active_bindings.get(app.COMMAND_PALETTE_BINDING)
            if found is not None:
                _node, binding, enabled, _tooltip = found
                palette = (app.get_key_display(binding), binding.description, enabled, binding.key)
        if (tuple(keys), palette) != (self.keys, self._palette):
            self.keys, self._palette = tuple(keys), palette
            self.refresh()  # one line, fixed size: no layout pass

    def render(self) -> Text:
        key_style = self.get_component_rich_style("keybar--key")
        text_style = self.get_component_rich_style("keybar--description")
        line, spans = Text(no_wrap=True, overflow="crop"), []
        for shown, description, enabled, key in self.keys:
            start = len(line)
            line.append(f" {shown} ", key_style)
            line.append(f"{description} ", text_style)
            if not enabled:
                line.stylize("dim", start)
            spans.append((start, len(line), key, enabled))
        if self._palette is not None:
            shown, description, enabled, key = self._palette
            right = Text.assemble(("▏", "dim"), (f"{shown} ", key_style), (description, text_style))
            gap = self.size.width - len(line) - len(right)
            if gap > 0:
                spans.append((len(line) + gap, self.size.width, key, enabled))
                line.append(" " * gap)
                line.append_text(right)
        self._spans = spans
        return line

    def on_click(self, event: events.Click) -> None:
        for start, end, key, enabled in self._spans:
            if start <= event.x < end:
                if enabled:
                    self.app.simulate_key(key)
                else:
                    self.app.bell()
                return
