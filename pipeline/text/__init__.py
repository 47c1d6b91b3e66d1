"""Text and tables: reading data files (`tables` and the readers it dispatches to), checking problems files
(`problems`), chat templates and think prefixes (`chat`), prompt templates (`prompts`), and the Arrow column and row
helpers the data-building steps share (`columns`, `rows`). Above `pipeline.core` only."""
