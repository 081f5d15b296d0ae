# The web side: sign up each e-mail address given; "rollback:ADDR" signs up ADDR inside a
# transaction that then rolls back (a later step of the request failed). Prints
# {"ADDR": user id} as JSON, rolled-back users included.
require "json"
require_relative "app"

ids = {}
ARGV.each do |arg|
  if arg.start_with?("rollback:")
    email = arg.delete_prefix("rollback:")
    ActiveRecord::Base.transaction do
      ids[email] = User.sign_up!(email).id
      raise ActiveRecord::Rollback
    end
  else
    ids[arg] = User.sign_up!(arg).id
  end
end
puts ids.to_json
