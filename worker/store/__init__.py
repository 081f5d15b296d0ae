"""The database: connections, the SQL files and the module that runs them, migrations."""
