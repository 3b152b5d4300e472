"""Training and generation data: row formats, file readers, chat templates, tokens and labels."""
