# Runs the README's Rails (ActiveRecord) snippet, read from stdin, the way a Rails app would
# run it: a standalone ActiveRecord connection, an Order model and an unsaved `order`.
# Env: README_DB (JSON: ActiveRecord's connection keys), README_USER_ID, README_LINE.
require "json"
require "active_record"

ActiveRecord::Base.establish_connection(
  adapter: "postgresql", **JSON.parse(ENV.fetch("README_DB"), symbolize_names: true)
)

class Order < ActiveRecord::Base
end

order = Order.new(user_id: Integer(ENV.fetch("README_USER_ID")), total_cents: 1999)
begin
  eval($stdin.read, binding, "README.md", Integer(ENV.fetch("README_LINE")))
rescue ActiveRecord::StatementInvalid => e
  # The one line the test reads: what PostgreSQL said.
  abort "sqlstate #{e.cause.result&.error_field(PG::Result::PG_DIAG_SQLSTATE)}: #{e.message}"
end
