"""The Matrix adapter: exposes Lambda chats as rooms in a per-user Space."""
