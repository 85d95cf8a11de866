"""Built-in handlers. Each module is imported only by the child serving its type."""
