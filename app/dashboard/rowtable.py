"""A keyed, row-cursor table that renders its own lines (Textual's line API).

Textual's DataTable renders every newly visible cell through Rich on each layout pass;
with the dashboard's 11 columns that was 60-100 ms per tab switch. Here a row is rendered
once into a cached strip of segments, and repainting a screenful is a dictionary lookup
per line plus a style. Columns have fixed widths, except the last, which takes the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from app.dashboard.format import Cells, Row
from app.dashboard.lineview import resize_virtual

#: Spaces each side of a cell, as DataTable's default cell padding.
PAD = 1


class RowTable(ScrollView, can_focus=True):
    """Rows keyed by id, updated by diff; only rows whose cells changed are re-rendered."""

    DEFAULT_CSS = """
    RowTable {
        background: $surface;
        color: $foreground;
        height: auto;
        max-height: 100%;
        overflow-x: hidden;
        &:focus {
            background-tint: $foreground 5%;
            & > .rowtable--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .rowtable--header { background-tint: $foreground 5%; }
        }
        & > .rowtable--header { text-style: bold; background: $panel; color: $foreground; }
        & > .rowtable--even-row { background: $surface-lighten-1 50%; }
        &:dark > .rowtable--even-row { background: $surface-darken-1 40%; }
        & > .rowtable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    COMPONENT_CLASSES = {"rowtable--header", "rowtable--even-row", "rowtable--cursor"}
    BINDINGS = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "first", "Top", show=False),
        Binding("end,ctrl+end", "last", "Bottom", show=False),
    ]

    class RowHighlighted(Message):
        """The cursor moved to another row (or the row under it changed key)."""

        def __init__(self, table: RowTable, key: str | None, row: int) -> None:
            super().__init__()
            self.table, self.key, self.row = table, key, row

        @property
        def control(self) -> RowTable:
            return self.table

    class RowSelected(RowHighlighted):
        """Enter was pressed on a row."""

    def __init__(self, columns: Sequence[str], widths: dict[str, int], **kwargs: str) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.columns = tuple(columns)
        self._fixed = tuple(widths[name] for name in self.columns[:-1])
        self._last_min = widths.get(self.columns[-1], 10)
        self._cells: dict[str, Cells] = {}
        self._order: list[str] = []
        self._index: dict[str, int] = {}
        self._strips: dict[str, Strip] = {}  # unstyled rendered rows, by key
        self._header: Strip | None = None
        self._widths: tuple[int, ...] = ()
        self.cursor_row = 0
        self.rendered = 0  # rows rendered into strips (a cache miss): for tests and benchmarks

    # ---- data -----------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    @property
    def keys(self) -> list[str]:
        return list(self._order)

    def get_row(self, key: str) -> Cells:
        return self._cells[key]

    def get_row_index(self, key: str) -> int:
        return self._index[key]

    @property
    def selected_key(self) -> str | None:
        if not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]

    def apply(self, rows: Sequence[Row]) -> bool:
        """Show `rows` in order; True when rows were added, removed or moved.

        The cursor stays on the same key when that row is still shown."""
        selected = self.selected_key
        keys = [key for key, _ in rows]
        structural = keys != self._order
        changed: list[str] = []
        cells_by_key = dict(rows)
        for key in self._cells.keys() - cells_by_key.keys():
            self._strips.pop(key, None)
        for key, cells in rows:
            if self._cells.get(key) != cells:
                self._strips.pop(key, None)
                changed.append(key)
        self._cells = cells_by_key
        if structural:
            self._order = keys
            self._index = {key: i for i, key in enumerate(keys)}
            row = self._index.get(selected, self.cursor_row) if selected else self.cursor_row
            self.cursor_row = max(0, min(row, len(keys) - 1))
            self._set_height()
            self.refresh()
            if self.selected_key != selected:
                self._highlighted()
        else:
            for key in changed:
                self.refresh_line(self._index[key] + 1)
        return structural

    def _set_height(self) -> None:
        # As wide as the view: the last column stretches, so there is never a sideways scroll.
        resize_virtual(self, Size(self.scrollable_content_region.width, len(self._order) + 1))

    # ---- cursor ---------------------------------------------------------------------------

    def move_cursor(self, *, row: int, scroll: bool = True) -> None:
        row = max(0, min(row, len(self._order) - 1))
        if row == self.cursor_row or not self._order:
            return
        old, self.cursor_row = self.cursor_row, row
        self.refresh_line(old + 1)
        self.refresh_line(row + 1)
        if scroll:
            self._scroll_to_cursor()
        self._highlighted()

    def _scroll_to_cursor(self) -> None:
        rows_visible = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + rows_visible:
            self.scroll_to(y=self.cursor_row - rows_visible + 1, animate=False, immediate=True)

    def _highlighted(self) -> None:
        self.post_message(self.RowHighlighted(self, self.selected_key, self.cursor_row))

    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - 2)

    def action_cursor_up(self) -> None:
        self.move_cursor(row=self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(row=self.cursor_row + 1)

    def action_page_up(self) -> None:
        self.move_cursor(row=self.cursor_row - self._page())

    def action_page_down(self) -> None:
        self.move_cursor(row=self.cursor_row + self._page())

    def action_first(self) -> None:
        self.move_cursor(row=0)

    def action_last(self) -> None:
        self.move_cursor(row=len(self._order) - 1)

    def action_select_cursor(self) -> None:
        if self.selected_key is not None:
            self.post_message(self.RowSelected(self, self.selected_key, self.cursor_row))

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1:  # line 0 is the header
            self.move_cursor(row=round(self.scroll_y) + event.y - 1)

    # ---- rendering ------------------------------------------------------------------------

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        last = max(width - sum(w + 2 * PAD for w in self._fixed) - 2 * PAD, self._last_min)
        widths = (*self._fixed, last)
        if widths != self._widths:
            self._widths = widths
            self._strips.clear()
            self._header = None
        self._set_height()
        self._scroll_to_cursor()

    def _row_strip(self, cells: Sequence[Text]) -> Strip:
        console = self.app.console
        segments: list[Segment] = []
        for cell, width in zip(cells, self._widths, strict=False):
            text = cell.copy()
            text.truncate(width, overflow="ellipsis", pad=True)
            text.pad(PAD)
            text.no_wrap = True
            segments.extend(text.render(console))
        return Strip(segments)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if not self._widths:
            return Strip.blank(width, self.rich_style)
        if y == 0:
            if self._header is None:
                self._header = self._row_strip([Text(name) for name in self.columns])
            return self._styled(self._header, "rowtable--header", width)
        row = round(self.scroll_y) + y - 1
        if not 0 <= row < len(self._order):
            return Strip.blank(width, self.rich_style)
        key = self._order[row]
        strip = self._strips.get(key)
        if strip is None:
            strip = self._strips[key] = self._row_strip(self._cells[key])
            self.rendered += 1
        if row == self.cursor_row:
            return self._styled(strip, "rowtable--cursor", width, over=True)
        return self._styled(strip, "rowtable--even-row" if row % 2 == 0 else None, width)

    def _styled(self, strip: Strip, component: str | None, width: int, over: bool = False) -> Strip:
        base = self.rich_style
        style = base + self.get_component_rich_style(component) if component else base
        line = strip.crop_extend(0, width, None)
        if over:  # the cursor's colours win over the cells'
            return Strip(Segment.apply_style(line, post_style=style), width)
        return line.apply_style(style)
