"""Fixed-size scrolling views that render their own lines (Textual's line API).

A Static whose content changes height asks the screen for a layout pass, and a layout pass
repaints every widget on the screen (20-30 ms with the dashboard's tables, on top of the frame
itself). The views here keep their own size: new content changes only their virtual (scrollable)
size, which `resize_virtual` applies without a layout pass when nothing else on the screen can
move because of it.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip


def resize_virtual(view: ScrollView, size: Size) -> None:
    """Give `view` a new virtual size, without a screen layout pass when that is safe.

    Safe means the view's own height does not follow its content (a fixed or fractional
    height) and its vertical scrollbar neither appears nor disappears (`overflow-y: scroll`,
    or `auto` with the content staying on the same side of the view's height)."""
    old, view_height = view.virtual_size, view.scrollable_content_region.height
    height, overflow = view.styles.height, view.styles.overflow_y
    if (height is None or height.is_auto) or (
        overflow == "auto" and (size.height > view_height) != (old.height > view_height)
    ):
        view.virtual_size = size  # the widget's height (or its scrollbar) changes: layout
        return
    # Nothing outside the view moves: set the size quietly, update the scrollbars, repaint.
    view.set_reactive(ScrollView.virtual_size, size)
    view._scroll_update(size)  # the scrollbars' range and the scroll position's clamp
    view.refresh()


class TextPane(ScrollView, can_focus=True):
    """One Rich renderable, rendered into lines once per `update` (and per width), scrollable.

    Its size comes from CSS, never from its content, so `update` repaints this pane only."""

    DEFAULT_CSS = """
    TextPane {
        height: 1fr;
        overflow-x: hidden;
        overflow-y: scroll;
        background: $surface;
    }
    """

    def __init__(self, content: RenderableType = "", **kwargs: str) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._content: RenderableType = content
        self._lines: list[Strip] = []
        self._rendered_width = -1

    @property
    def content(self) -> RenderableType:
        """What the pane shows (as Static.content)."""
        return self._content

    def update(self, content: RenderableType) -> None:
        """Show `content` from its first line; no layout pass."""
        self._content = content
        self._render_content()
        self.scroll_to(y=0, animate=False, immediate=True)

    def on_resize(self) -> None:
        if self.scrollable_content_region.width != self._rendered_width:
            self._render_content()

    def _render_content(self) -> None:
        width = self.scrollable_content_region.width
        self._rendered_width = width
        if width <= 0:
            self._lines = []
            return
        content = self._content
        if isinstance(content, str):
            content = Text(content)
        console = self.app.console
        options = console.options.update(width=width, height=None, highlight=False)
        lines = console.render_lines(content, options, pad=False)
        self._lines = [Strip(line).crop_extend(0, width, None) for line in lines]
        resize_virtual(self, Size(width, len(self._lines)))
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        row = round(self.scroll_y) + y
        if 0 <= row < len(self._lines):
            return self._lines[row].crop_extend(0, width, None).apply_style(self.rich_style)
        return Strip.blank(width, self.rich_style)
