"""Modal screens: the key help (`?`), a yes/no confirmation, and the quit question of --tui."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Label, Static

#: (key, what it does), in the order the help screen and README list them.
KEYS = (
    ("p / r", "pause / resume the GPU under the GPU cursor (no new jobs start on it)"),
    ("a / Enter", "attach to the selected job's tmux session (detach with Ctrl-b d to return)"),
    ("k", "kill the selected job (asks first); a pending job is taken off the queue"),
    ("R", "retry the selected failed, killed, lost or unschedulable job"),
    ("+ / -", "raise / lower the selected pending job's priority (lower number runs first)"),
    ("d", "remove the selected pending job from the queue"),
    ("/", "filter jobs by text (id, script, env, arguments, reason); Esc clears"),
    ("1 … 6", "tabs: Queue, Running, Done, Failed, All, jobs-file Errors"),
    ("Tab", "move between the GPU table and the jobs table"),
    ("l", "show / hide the log pane"),
    ("Ctrl-p", "command palette: every action by name"),
    ("?", "this help"),
    ("q", "quit the dashboard (jobs keep running)"),
)


class HelpScreen(Screen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 100; height: auto; border: thick $accent; background: $surface; padding: 1 2;
    }
    """

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in KEYS:
            table.add_row(key, what)
        with Vertical():
            yield Static("[b]gpusched dashboard — keys[/b]\n")
            yield Static(table)
            yield Static(
                "\nEvery action goes through the state database, like the CLI: it works whether "
                "the scheduler runs in this process, another one, or not at all.\n"
                "[dim]Esc or ? closes this help.[/dim]"
            )


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y/Enter answers yes, n/Esc no."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Grid {
        grid-size: 2; grid-gutter: 1 2; grid-rows: auto 3; width: 64; height: auto;
        border: thick $error; background: $surface; padding: 1 2;
    }
    ConfirmScreen Label { column-span: 2; width: 100%; }
    ConfirmScreen Button { width: 100%; }
    """

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Grid():
            yield Label(self.question)
            yield Button(f"{self.yes} (y)", variant="error", id="yes")
            yield Button(f"{self.no} (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class QuitScreen(ModalScreen[str]):
    """`start --tui` only: the scheduler runs in this process, so quitting asks what to do."""

    BINDINGS = [
        Binding("b", "choose('background')", "keep running"),
        Binding("s", "choose('stop')", "stop"),
        Binding("escape,c", "choose('cancel')", "cancel"),
    ]
    DEFAULT_CSS = """
    QuitScreen { align: center middle; }
    QuitScreen > Vertical {
        width: 72; height: auto; border: thick $warning; background: $surface; padding: 1 2;
    }
    QuitScreen Button { width: 100%; margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                "The scheduler runs inside this dashboard. Running jobs keep running either way."
            )
            yield Button("Keep the scheduler running in the background (b)", id="background")
            yield Button("Stop the scheduler (s)", id="stop", variant="warning")
            yield Button("Cancel (c)", id="cancel", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#background", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
